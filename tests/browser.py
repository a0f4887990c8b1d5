"""A real browser for the console's tests: Debian's chromium (installed by
`scripts/setup.sh --test`) driven by Playwright, never a browser Playwright downloads.

Each launch gets a fresh profile directory under the test's tmp dir. Tests skip, with the
reason, only when /usr/bin/chromium is absent; CI installs it, so they run there.

Must not import project modules: it is test plumbing around a browser.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
FAKE_MICROPHONE_ARGS = (
    "--use-fake-ui-for-media-stream",  # grant the microphone without a prompt
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
)


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"{CHROMIUM} is not installed (scripts/setup.sh --test installs Debian's chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (requirements-dev.txt)"
    return None


needs_chromium = pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))


@asynccontextmanager
async def chromium(
    profile_dir: Path, *, extra_args: Sequence[str] = (), viewport: tuple[int, int] = (1280, 800)
) -> AsyncIterator[object]:
    """A persistent Playwright context on the system chromium with a fresh profile in
    `profile_dir`, made by Chromium if missing (Playwright refuses `--user-data-dir` in
    `args`: this is that flag)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=CHROMIUM,
            headless=True,
            args=[*CHROMIUM_ARGS, *extra_args],
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            yield context
        finally:
            await context.close()
