"""A real uvicorn server (the HTTP tests' ``running``) serving ``create_app``
over a SQLite Conductor with a worker in the same loop, and a headless Chromium
(Debian's package, never a downloaded browser) driven by Playwright."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, async_playwright

from substantial import Conductor, Workflow
from substantial.http import create_app

from ..http.conftest import running
from .flows import ALL

# Debian's package; elsewhere point SUBSTANTIAL_CHROMIUM at a Chromium binary.
CHROMIUM = os.environ.get("SUBSTANTIAL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class Site:
    conductor: Conductor
    url: str


@contextlib.asynccontextmanager
async def site(
    db: Path, *, token: str | None = None, extra: tuple[Workflow[Any], ...] = ()
) -> AsyncIterator[Site]:
    conductor = Conductor(f"sqlite:///{db}")
    conductor.register(*ALL, *extra)
    worker = conductor.run(handle_sigterm=False)
    try:
        async with running(create_app(conductor, token=token)) as url:
            yield Site(conductor=conductor, url=url)
    finally:
        worker.cancel()
        await worker
        await conductor.close()


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Headless Chromium; raises if the browser cannot start."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()
