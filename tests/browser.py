"""Driving Debian's headless Chromium with Playwright for the page tests.

``browser_page(name)`` opens a fresh page, records every console error and
uncaught page error into the list it yields, and on the way out saves a
full-page screenshot to ``$MESHHEALTH_ARTIFACTS/<name>.png`` (default
``<repo>/test-artifacts``), whether the test passed or not, so a failure
can be looked at.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("MESHHEALTH_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get(
        "MESHHEALTH_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"
    )
)


def artifact_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"


@asynccontextmanager
async def browser_page(name: str) -> AsyncIterator[tuple[Any, list[str]]]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run deploy/dev-setup.sh (it installs chromium)")
    from playwright.async_api import async_playwright

    errors: list[str] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None,
            )
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.set_default_timeout(30_000)
            try:
                yield page, errors
            finally:
                await page.screenshot(path=str(artifact_path(name)), full_page=True)
        finally:
            await browser.close()


async def chart_points(page: Any, selector: str) -> int:
    """How many points the chart in ``selector`` drew (0 if it has not drawn yet)."""
    got = await page.get_attribute(f"{selector} svg.mh-chart", "data-points")
    return int(got or 0)


async def chart_max(page: Any, selector: str) -> float:
    """The largest value the chart in ``selector`` drew (-inf if it drew none)."""
    got = await page.get_attribute(f"{selector} svg.mh-chart", "data-max")
    return float(got) if got else float("-inf")
