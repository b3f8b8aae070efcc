"""The recovery actions and the "no worker" flag, in real headless Chromium against
a real server and worker: resume a failed run after the fix, fork from a step and
land on the new run, cancel and revert a suspended run, an action's error shown on
the page, and PENDING runs that no live worker serves marked in the list and on
their page (and one that a live, busy worker serves not marked)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from substantial import RunFailed, RunReverted, RunStatus

from ..engine.helpers import eventually
from . import flows
from .harness import Site, site


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Site]:
    """The dashboard's site, its worker serving the recovery workflows too."""
    async with site(tmp_path / "state.db", extra=flows.RECOVERY) as s:
        yield s


async def failed_run(served: Site) -> tuple[str, str]:
    """A ``repairable`` run that failed on the bug in its third step: (key, run id)."""
    key = uuid.uuid4().hex
    flows.bugged.add(key)
    handle = await served.conductor.start(flows.repairable, {"key": key})
    with pytest.raises(RunFailed):
        await handle.result(timeout=30)
    return key, handle.run_id


def ran(key: str) -> list[int]:
    """How many times each of the three steps of ``key``'s runs executed."""
    return [flows.ran[f"{key}:{n}"] for n in range(3)]


async def test_resume_from_the_page_after_the_fix(served: Site, page: Page) -> None:
    key, run_id = await failed_run(served)
    await page.goto(f"{served.url}/runs/{run_id}")
    await expect(page.locator("#s-status")).to_have_text("FAILED")
    await expect(page.locator("#outcome")).to_contain_text("bug in step 2")
    await expect(page.locator("#cancel")).to_be_disabled()
    await expect(page.locator("#revert")).to_be_disabled()
    flows.bugged.discard(key)  # the fix is deployed
    await page.click("#resume")
    await expect(page.locator("#s-status")).to_have_text("COMPLETED")
    await expect(page.locator("#outcome")).to_contain_text("2")
    await expect(page.locator("#resume")).to_be_disabled()
    assert await served.conductor.handle(run_id).result() == [0, 1, 2]
    assert ran(key) == [1, 1, 2]  # steps one and two did not run again


async def test_an_action_the_api_refuses_says_why_on_the_page(served: Site, page: Page) -> None:
    key, run_id = await failed_run(served)
    await page.goto(f"{served.url}/runs/{run_id}")
    await expect(page.locator("#s-status")).to_have_text("FAILED")
    # Meanwhile someone else fixes and resumes it; this page still offers Resume.
    flows.bugged.discard(key)
    await served.conductor.handle(run_id).resume()
    assert await served.conductor.handle(run_id).result(timeout=30) == [0, 1, 2]
    await page.click("#resume")
    message = page.locator("#action-message")
    await expect(message).to_contain_text("409 RunNotResumable")
    await expect(message).to_contain_text("COMPLETED")
    await expect(message).to_have_class("error")
    await expect(page.locator("#notice")).to_contain_text("409")


async def test_fork_from_step_2_lands_on_the_new_run(served: Site, page: Page) -> None:
    key = uuid.uuid4().hex
    original = await served.conductor.start(flows.repairable, {"key": key})
    assert await original.result(timeout=30) == [0, 1, 2]
    await page.goto(f"{served.url}/runs/{original.run_id}")
    await expect(page.locator("#s-status")).to_have_text("COMPLETED")
    ship = page.locator('#timeline .entry[data-kind="save"]').nth(2)
    await expect(ship.locator(".name")).to_have_text("ship")
    await expect(ship.locator(".seq")).to_have_text("#2")  # the number the form takes
    await page.fill("#fork-step", "2")
    await page.click("#fork button")
    await page.wait_for_url(re.compile(r"/runs/(?!" + re.escape(original.run_id) + r"$)[^/]+$"))
    forked = page.url.rsplit("/", 1)[1]
    await expect(page.locator("#r-id")).to_have_text(forked)
    await expect(page.locator("#s-status")).to_have_text("COMPLETED")
    await expect(page.locator("#s-workflow")).to_have_text("repairable")
    await expect(page.locator('#timeline .entry[data-kind="save"]')).to_have_count(3)
    assert await served.conductor.handle(forked).result() == [0, 1, 2]
    assert ran(key) == [1, 1, 2]  # the fork ran step 2 again, not steps 0 and 1
    assert await original.status() == RunStatus.COMPLETED  # the original is untouched
    assert len((await served.conductor.history(original.run_id)).entries) == 4


async def test_cancel_and_revert_from_the_page(served: Site, page: Page) -> None:
    key = uuid.uuid4().hex
    handle = await served.conductor.start(flows.refundable, {"key": key})
    await page.goto(f"{served.url}/runs/{handle.run_id}")
    await expect(page.locator("#s-status")).to_have_text("SUSPENDED")
    await expect(page.locator("#resume")).to_be_disabled()
    await page.click("#revert")
    await expect(page.locator("#s-status")).to_have_text("REVERTED")
    await expect(page.locator("#revert")).to_be_disabled()
    await expect(page.locator("#resume")).to_be_disabled()
    with pytest.raises(RunReverted):
        await handle.result(timeout=30)
    assert flows.undone[key] == ["flight", "hotel"]  # once each, newest first


async def test_a_pending_run_no_worker_serves_is_marked(served: Site, page: Page) -> None:
    c = served.conductor
    mistyped = await c.start("wiater", run_id="mistyped")  # no worker has this name
    key = uuid.uuid4().hex
    flows.gates[key] = asyncio.Event()
    # A worker of its own on "narrow", one run at a time: the first run keeps it
    # busy, so the second waits PENDING while a live worker serves it.
    narrow = c.run(queues=["narrow"], concurrency=1, handle_sigterm=False)
    try:
        busy = await c.start(flows.hold, {"key": key}, run_id="busy", queue="narrow")

        async def running() -> bool:
            return await busy.status() == RunStatus.RUNNING

        await eventually(running, timeout=30)
        await c.start(flows.hold, {"key": key}, run_id="queued", queue="narrow")

        await page.goto(served.url + "/")
        row = page.locator('#runs tr[data-run-id="mistyped"]')
        await expect(row.locator(".status")).to_contain_text("PENDING")
        await expect(row.locator(".badge.unserved")).to_have_text("no worker")
        queued = page.locator('#runs tr[data-run-id="queued"]')
        await expect(queued.locator(".status")).to_contain_text("PENDING")
        await expect(queued.locator(".badge")).to_have_count(0)

        await page.goto(f"{served.url}/runs/{mistyped.run_id}")
        warning = page.locator("#unserved")
        await expect(warning).to_be_visible()
        await expect(warning).to_contain_text("workflow 'wiater' on queue 'default'")
        await page.goto(f"{served.url}/runs/queued")
        await expect(page.locator("#s-status")).to_have_text("PENDING")
        await expect(page.locator("#unserved")).to_be_hidden()
    finally:
        flows.gates[key].set()
        narrow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await narrow
        del flows.gates[key]
