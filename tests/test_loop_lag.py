"""The event-loop lag the service reports on /metrics, from its own loop under uvicorn."""

from __future__ import annotations

import asyncio
import re
import time

from tests.harness import LiveStack

LAG = "aisdr_event_loop_lag_seconds"


def lag_counts(metrics: str) -> tuple[float, float]:
    """(observations in all, observations within 0.25 s) from the Prometheus text."""
    total = re.search(rf"^{LAG}_count (\S+)$", metrics, re.M)
    within = re.search(rf'^{LAG}_bucket{{le="0.25"}} (\S+)$', metrics, re.M)
    assert total and within, "the loop-lag histogram is missing from /metrics"
    return float(total.group(1)), float(within.group(1))


async def _block_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # noqa: ASYNC251  (on purpose: nothing else runs on its loop meanwhile)


async def test_a_stalled_event_loop_shows_in_the_lag_histogram(tmp_path):
    with LiveStack(tmp_path) as stack:
        total, within = lag_counts(await stack.metrics())
        late_before = total - within
        assert stack.server is not None
        stack.server.run_in_loop(_block_the_loop(0.7))
        # a sample came due during the stall and woke at its end, at least 0.45 s late
        async with asyncio.timeout(5):
            while True:
                total, within = lag_counts(await stack.metrics())
                if total - within > late_before:
                    break
                await asyncio.sleep(0.05)
    assert total - within > late_before
