"""The dashboard in real headless Chromium against a real server and worker:
the runs list (counts, filters, pages, auto-refresh), a run page (summary,
result or error, timeline bars and marks, children, logs) and its actions
(send an event, cancel), and the token prompt."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from playwright.async_api import Page, expect
from starlette.applications import Starlette
from starlette.routing import Mount

from substantial import Conductor, RunFailed
from substantial.http import create_app

from ..http.conftest import running
from .flows import ALL, broken, chatty, flaky, grandparent, parent, waiter
from .harness import Site, site


async def settled(served: Site) -> dict[str, str]:
    """One run of each workflow, each finished except the waiter; their ids."""
    c = served.conductor
    done = await c.start(flaky, {"key": uuid.uuid4().hex})
    assert (await done.result(timeout=30)).startswith("ok after")
    family = await c.start(parent, {"n": 4})
    assert await family.result(timeout=30) == {"child": 5}
    failing = await c.start(broken)
    with pytest.raises(RunFailed):
        await failing.result(timeout=30)
    waiting = await c.start(waiter, {"note": "<img src=x onerror=alert(1)>"})
    return {
        "flaky": done.run_id,
        "parent": family.run_id,
        "broken": failing.run_id,
        "waiter": waiting.run_id,
    }


async def test_the_list_shows_runs_counts_and_filters_by_status(served: Site, page: Page) -> None:
    ids = await settled(served)
    await page.goto(served.url + "/")
    runs = page.locator("#runs tbody tr")
    await expect(runs).to_have_count(5)  # the four started and the parent's child
    for run_id in ids.values():
        await expect(page.locator(f'#runs tr[data-run-id="{run_id}"]')).to_be_visible()
    counts = page.locator("#counts")
    await expect(counts.locator('tr[data-workflow="broken"]')).to_contain_text("FAILED 1")
    await expect(counts.locator('tr[data-workflow="flaky"]')).to_contain_text("COMPLETED 1")
    await expect(counts.locator('tr[data-workflow="leaf"]')).to_contain_text("COMPLETED 1")

    await page.select_option("#f-status", "FAILED")
    await expect(runs).to_have_count(1)
    await expect(runs.first).to_have_attribute("data-run-id", ids["broken"])
    await page.select_option("#f-status", "")
    await page.select_option("#f-workflow", "flaky")
    await expect(runs).to_have_count(1)
    await expect(runs.first).to_have_attribute("data-run-id", ids["flaky"])

    # by start time (the flaky run has started: it has ended)
    await page.fill("#f-after", "2099-01-01T00:00")
    await expect(page.locator("#runs td.empty")).to_have_text("no runs")
    await page.fill("#f-after", "2000-01-01T00:00")
    await page.fill("#f-before", "2099-01-01T00:00")
    await expect(runs).to_have_count(1)
    await expect(runs.first).to_have_attribute("data-run-id", ids["flaky"])
    await page.fill("#f-before", "2000-01-02T00:00")
    await expect(page.locator("#runs td.empty")).to_have_text("no runs")


async def test_the_list_pages_by_cursor_and_refreshes_itself(served: Site, page: Page) -> None:
    c = served.conductor
    for i in range(51):  # one more than a page, on a queue no worker serves
        await c.start(waiter, {"note": str(i)}, run_id=f"idle-{i:02}", queue="idle")
    await page.goto(served.url + "/")
    runs = page.locator("#runs tbody tr")
    await expect(runs).to_have_count(50)
    first_page = set(await runs.evaluate_all("rows => rows.map(r => r.dataset.runId)"))
    await page.click("#next")
    await expect(runs).to_have_count(1)
    last = await runs.first.get_attribute("data-run-id")
    assert last is not None and last.startswith("idle-") and last not in first_page
    await expect(page.locator("#next")).to_be_disabled()
    await page.click("#first")
    await expect(runs).to_have_count(50)

    await page.select_option("#f-workflow", "waiter")
    await page.select_option("#f-status", "COMPLETED")
    await expect(page.locator("#runs td.empty")).to_have_text("no runs")
    await page.check("#auto")
    handle = await c.start(flaky, {"key": "refresh"})
    await handle.result(timeout=30)
    await page.select_option("#f-workflow", "")  # flaky runs count too now
    row = page.locator(f'#runs tr[data-run-id="{handle.run_id}"]')
    await expect(row).to_be_visible()
    second = await c.start(flaky, {"key": "refresh-2"})
    await second.result(timeout=30)
    # no click: the switch reloads the list on its own
    await expect(page.locator(f'#runs tr[data-run-id="{second.run_id}"]')).to_be_visible()


async def test_a_run_page_draws_its_timeline_with_retries_and_its_children(
    served: Site, page: Page
) -> None:
    ids = await settled(served)
    await page.goto(f"{served.url}/runs/{ids['flaky']}")
    await expect(page.locator("#s-status")).to_have_text("COMPLETED")
    await expect(page.locator("#outcome")).to_have_text('"ok after 2"')
    save = page.locator('#timeline .entry[data-kind="save"]')
    await expect(save).to_have_count(1)
    await expect(save.locator(".name")).to_have_text("charge")
    await expect(save.locator(".bar")).to_have_count(1)
    await expect(save.locator(".mark.retry")).to_have_text("↻2")
    await expect(save.locator(".error")).to_have_text("the first try fails")
    width = await save.locator(".bar").evaluate("b => parseFloat(b.style.width)")
    assert 0 < width <= 100  # scaled to the run's span
    await expect(page.locator('#timeline .entry[data-kind="end"]')).to_have_count(1)
    await expect(page.locator("#logs li")).to_contain_text(["charging"])

    await page.goto(f"{served.url}/runs/{ids['parent']}")
    await expect(page.locator("#s-status")).to_have_text("COMPLETED")
    await expect(page.locator('#timeline .entry[data-kind="child"]')).to_have_count(1)
    child = page.locator("#children a")
    await expect(child).to_have_count(1)
    await child.click()
    await expect(page.locator("#s-workflow")).to_have_text("leaf")
    await expect(page.locator("#kwargs")).to_contain_text('"n": 4')
    await expect(page.locator("#summary a")).to_have_text(ids["parent"])  # back to the parent


async def test_children_show_as_a_linked_tree(served: Site, page: Page) -> None:
    top = await served.conductor.start(grandparent)
    assert await top.result(timeout=30) == {"child": 8}
    await page.goto(f"{served.url}/runs/{top.run_id}")
    middle = page.locator("#children > li")
    await expect(middle).to_have_count(1)
    await expect(middle.locator("> .tree-workflow")).to_have_text("parent")
    await expect(middle.locator("> .status")).to_have_text("COMPLETED")
    bottom = middle.locator("ul > li")
    await expect(bottom).to_have_count(1)
    await expect(bottom.locator(".tree-workflow")).to_have_text("leaf")
    leaf_id = await bottom.get_attribute("data-run-id")
    await bottom.locator("a").click()
    await expect(page.locator("#r-id")).to_have_text(str(leaf_id))
    await expect(page.locator("#s-workflow")).to_have_text("leaf")


async def test_a_failed_run_shows_its_error_and_type_as_text(served: Site, page: Page) -> None:
    ids = await settled(served)
    await page.goto(f"{served.url}/runs/{ids['broken']}")
    await expect(page.locator("#s-status")).to_have_text("FAILED")
    await expect(page.locator("#outcome-title")).to_have_text("Error: ValueError")
    await expect(page.locator("#outcome")).to_contain_text("boom: <b>not bold</b>")
    assert await page.locator("#outcome b").count() == 0  # text, never markup
    await expect(page.locator("#cancel")).to_be_disabled()


async def test_sending_an_event_from_the_page_completes_the_run(served: Site, page: Page) -> None:
    ids = await settled(served)
    await page.goto(f"{served.url}/runs/{ids['waiter']}")
    await expect(page.locator("#s-status")).to_have_text("SUSPENDED")
    await expect(page.locator("#kwargs")).to_contain_text("<img src=x onerror=alert(1)>")
    assert await page.locator("#kwargs img").count() == 0
    await expect(page.locator('#timeline .entry[data-kind="sleep"] .mark.timer')).to_have_count(1)
    await page.fill("#e-name", "decision")
    await page.fill("#e-payload", '{"approved": true}')
    await page.click("#send button")
    await expect(page.locator("#s-status")).to_have_text("COMPLETED")
    await expect(page.locator("#outcome")).to_contain_text('"approved": true')
    await expect(page.locator('#timeline .entry[data-kind="event"] .mark.event')).to_have_count(1)
    assert await served.conductor.handle(ids["waiter"]).result() == {"decision": {"approved": True}}


async def test_a_bad_payload_is_refused_in_the_page(served: Site, page: Page) -> None:
    ids = await settled(served)
    await page.goto(f"{served.url}/runs/{ids['waiter']}")
    await expect(page.locator("#s-status")).to_have_text("SUSPENDED")
    await page.fill("#e-name", "decision")
    await page.fill("#e-payload", "{not json")
    await page.click("#send button")
    await expect(page.locator("#notice")).to_contain_text("not JSON")
    await expect(page.locator("#s-status")).to_have_text("SUSPENDED")


async def test_cancelling_from_the_page_cancels_the_run(served: Site, page: Page) -> None:
    ids = await settled(served)
    await page.goto(f"{served.url}/runs/{ids['waiter']}")
    await expect(page.locator("#s-status")).to_have_text("SUSPENDED")
    await page.click("#cancel")
    await expect(page.locator("#s-status")).to_have_text("CANCELLED")
    await expect(page.locator("#cancel")).to_be_disabled()
    assert str(await served.conductor.handle(ids["waiter"]).status()) == "CANCELLED"


async def test_with_a_token_the_page_asks_once_and_keeps_it(tmp_path: Path, page: Page) -> None:
    token = "s3cret"
    async with site(tmp_path / "state.db", token=token) as served:
        handle = await served.conductor.start(flaky, {"key": "token"})
        await handle.result(timeout=30)
        await page.goto(served.url + "/")
        await expect(page.locator("#login")).to_be_visible()
        await page.fill("#token", token)
        await page.click("#login button")
        await expect(page.locator(f'#runs tr[data-run-id="{handle.run_id}"]')).to_be_visible()
        await page.reload()  # the cookie holds it: no second prompt
        await expect(page.locator(f'#runs tr[data-run-id="{handle.run_id}"]')).to_be_visible()
        await expect(page.locator("#login")).to_be_hidden()


async def test_a_long_timeline_comes_in_pages_behind_more(served: Site, page: Page) -> None:
    handle = await served.conductor.start(chatty, {"lines": 250})
    assert await handle.result(timeout=30) == 250
    await page.goto(f"{served.url}/runs/{handle.run_id}")
    entries = page.locator("#timeline .entry")
    await expect(entries).to_have_count(200)  # one page of the history
    await expect(page.locator("#more")).to_be_visible()
    await page.click("#more")
    await expect(entries).to_have_count(251)  # 250 log lines and the end
    await expect(page.locator("#more")).to_be_hidden()
    await expect(entries.last).to_have_attribute("data-kind", "end")


async def test_an_unknown_run_says_so_and_an_unknown_asset_is_404(served: Site, page: Page) -> None:
    await page.goto(f"{served.url}/runs/no-such-run")
    await expect(page.locator("#notice")).to_contain_text("404")
    response = await page.request.get(f"{served.url}/ui/secret.py")
    assert response.status == 404


async def test_mounted_under_a_prefix_the_page_finds_its_files_and_the_api(
    tmp_path: Path, page: Page
) -> None:
    conductor = Conductor(f"sqlite:///{tmp_path}/state.db")
    conductor.register(*ALL)
    worker = conductor.run(handle_sigterm=False)
    host = Starlette(routes=[Mount("/ops", create_app(conductor))])
    try:
        async with running(host) as url:
            handle = await conductor.start(flaky, {"key": uuid.uuid4().hex})
            await handle.result(timeout=30)
            await page.goto(url + "/ops/")
            link = page.locator(f'#runs tr[data-run-id="{handle.run_id}"] a')
            await expect(link).to_have_attribute("href", f"/ops/runs/{handle.run_id}")
            await link.click()
            await expect(page.locator("#s-status")).to_have_text("COMPLETED")
            await expect(page.locator("#timeline .entry .bar").first).to_be_visible()
    finally:
        worker.cancel()
        await worker
        await conductor.close()
