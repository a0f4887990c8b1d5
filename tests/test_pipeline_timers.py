"""The pipeline's periodic waits end on grids of the loop's clock, shared by all calls, so
one wake-up of the loop serves every call's timer (voice_pipeline.WATCHDOG_S,
PACER_GRID_S)."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.playout import PACER_GRID_S, on_grid
from voice_pipeline import WATCHDOG_S


@pytest.mark.parametrize("grid", [PACER_GRID_S, WATCHDOG_S])
@pytest.mark.parametrize("delay", [0.0, 0.0123, 0.05, 0.2999])
@pytest.mark.parametrize("now", [0.0, 1234.5678, 98765.4321])
def test_a_wait_is_lengthened_to_the_next_grid_point(delay: float, grid: float, now: float) -> None:
    waited = on_grid(delay, grid, now)
    assert delay <= waited < delay + grid + 1e-9
    off_grid = (now + waited) % grid
    assert min(off_grid, grid - off_grid) < 1e-9


async def test_two_calls_timers_wake_the_loop_together() -> None:
    """Two watchdog waits started at different moments end at the same instant."""
    loop = asyncio.get_running_loop()
    now = loop.time()  # one reading per wait: two could straddle a pause of a busy machine
    first = now + on_grid(WATCHDOG_S / 2, WATCHDOG_S, now)
    await asyncio.sleep(0.013)
    now = loop.time()
    second = now + on_grid(WATCHDOG_S / 2, WATCHDOG_S, now)
    assert second - first == pytest.approx(0.0, abs=1e-4) or second - first == pytest.approx(
        WATCHDOG_S, abs=1e-4
    )
