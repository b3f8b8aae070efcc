from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect

from ..backends import unavailable
from .harness import Site, chromium, site

# The machine is shared: give the page time; every wait is on a condition.
expect.set_options(timeout=20_000)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    try:
        manager = chromium()
        started = await manager.__aenter__()
    except Exception as exc:  # no chromium package: skip locally, fail in CI
        unavailable("chromium", exc)
    try:
        yield started
    finally:
        await manager.__aexit__(None, None, None)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Site]:
    async with site(tmp_path / "state.db") as s:
        yield s


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context()
    p = await context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield p
    finally:
        await context.close()
    assert not errors, f"the page raised: {errors}"
