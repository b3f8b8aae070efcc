"""The docs' code runs as written: blocks are read from the markdown at test time,
so a page and its test cannot drift apart."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Route

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "docs" / "quickstart.md"


@dataclass(frozen=True)
class Block:
    section: str  # the ``## `` heading the block sits under
    line: int  # 1-based line of its first code line in the page
    code: str


def python_blocks(page: Path) -> list[Block]:
    """Every ```python fenced block of ``page``, with the section it belongs to."""
    blocks: list[Block] = []
    body: list[str] = []
    section, fence, start = "", None, 0
    for n, line in enumerate(page.read_text().splitlines(), start=1):
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif m := re.match(r"^(```+)\s*python\s*$", line):
                fence, start, body = m.group(1), n + 1, []
        elif line.strip() == fence:
            blocks.append(Block(section, start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    return blocks


def run_blocks(blocks: list[Block], page: Path) -> dict[str, Any]:
    """Execute ``blocks`` in order in one namespace, as a reader pasting them would;
    tracebacks point at the page's own lines."""
    namespace: dict[str, Any] = {"__name__": f"docs.{page.stem}"}
    for b in blocks:
        code = compile("\n" * (b.line - 1) + b.code, str(page), "exec")
        exec(code, namespace)
    return namespace


def section(blocks: list[Block], name: str) -> list[Block]:
    found = [b for b in blocks if b.section == name]
    assert found, f"{QUICKSTART.name} has no python block under '## {name}'"
    return found


async def test_the_quickstart_testing_recipe_runs_as_written() -> None:
    blocks = python_blocks(QUICKSTART)
    # the recipe tests the workflow of "A first workflow", exactly as the page defines it
    recipe = section(blocks, "A first workflow") + section(blocks, "Testing workflows")
    namespace = run_blocks(recipe, QUICKSTART)
    tests = {k: v for k, v in namespace.items() if k.startswith("test_") and callable(v)}
    assert list(tests) == ["test_checkout"], list(tests)
    await tests["test_checkout"]()


TEST_HOWTO = ROOT / "docs" / "how-to" / "test-workflows.md"


async def test_the_testing_how_to_runs_as_written() -> None:
    """Every block of "Test your workflows", in order; then each test it defines."""
    namespace = run_blocks(python_blocks(TEST_HOWTO), TEST_HOWTO)
    tests = {k: v for k, v in namespace.items() if k.startswith("test_") and callable(v)}
    assert len(tests) == 3, list(tests)
    for test in tests.values():
        await test()


FLOW_HOWTO = ROOT / "docs" / "how-to" / "flow-control.md"


async def test_the_flow_control_how_to_runs_as_written() -> None:
    namespace = run_blocks(python_blocks(FLOW_HOWTO), FLOW_HOWTO)
    tests = {k: v for k, v in namespace.items() if k.startswith("test_") and callable(v)}
    assert list(tests) == [
        "test_the_report_runs_every_night",
        "test_an_unanswered_quote_expires",
        "test_one_import_per_customer_and_refunds_first",
        "test_imports_are_found_by_customer",
        "test_runs_before_and_after_the_emit_see_the_same_prices",
    ], list(tests)
    for test in tests.values():
        await test()


def test_the_quickstart_run_it_example_runs_on_the_default_store(tmp_path: Path) -> None:
    """ "A first workflow" then the first block of "Run it", as one script in a fresh
    directory: the default store (SQLite under ./.substantial/), a worker, a run."""
    blocks = python_blocks(QUICKSTART)
    script = (
        section(blocks, "A first workflow")
        + section(blocks, "Run it: worker, start, send, result")[:1]
    )
    path = tmp_path / "quickstart_run.py"
    path.write_text("".join(b.code for b in script))
    env = {k: v for k, v in os.environ.items() if k != "SUBSTANTIAL_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    # what the page's comments say it prints
    assert proc.stdout.splitlines() == [
        "charging 30 for A-1",
        "{'receipt': 'receipt-A-1', 'ship_to': '1 Main Street'}",
        "COMPLETED",
    ]
    assert (tmp_path / ".substantial" / "state.db").exists()


def test_the_block_reader_finds_sections_and_lines(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# T\n## One\n```python\nx = 1\n```\n## Two\n```console\n$ ls\n```\n")
    [b] = python_blocks(page)
    assert (b.section, b.line, b.code) == ("One", 4, "x = 1\n")
    with pytest.raises(ZeroDivisionError) as info:
        run_blocks([Block("One", 4, "1 / 0\n")], page)
    assert info.traceback[-1].lineno + 1 == 4  # reported at the page's own line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#+\s+(.*)$", line)):
            out.add(slug(m.group(1)))
    return out


PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_pages_and_headings(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert broken == [], f"{page.relative_to(ROOT)}: broken links {broken}"


# -- the CLI and HTTP references against the code -------------------------------------

CLI_REF = ROOT / "docs" / "reference" / "cli.md"
HTTP_REF = ROOT / "docs" / "reference" / "http.md"
OPERATE = ROOT / "docs" / "how-to" / "operate-in-production.md"
GLOBAL_OPTIONS = {"--backend": True, "--json": False, "--help": False}  # takes a value?


def cli_commands() -> dict[str, set[str]]:
    """Each ``substantial`` command with the options it accepts."""
    import typer.main

    from substantial.cli import app

    commands: dict[str, Any] = getattr(typer.main.get_command(app), "commands")  # noqa: B009
    return {
        name: {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        for name, cmd in commands.items()
    }


def command_lines(page: Path) -> list[str]:
    """What follows ``substantial `` in the page's code: fenced blocks other than
    python, and inline code spans."""
    found: list[str] = []
    fence: str | None = None
    for line in page.read_text().splitlines():
        if fence is None and (m := re.match(r"^(```+)\s*(\w*)", line)):
            fence = m.group(2) or "text"
            continue
        if fence is not None and line.startswith("```"):
            fence = None
            continue
        if fence == "python":
            continue
        spans = [line] if fence is not None else re.findall(r"`([^`]+)`", line)
        for span in spans:
            found += re.findall(r"(?:^|[\s/=])substantial((?: +[^\s#][^#]*)?)", span)
    return [f.strip() for f in found if f.strip()]


def check_command_line(text: str, commands: dict[str, set[str]]) -> str | None:
    """Why ``substantial TEXT`` is not a real command line (None: it is)."""
    words = text.split()
    while words and words[0] in GLOBAL_OPTIONS:
        words = words[2:] if GLOBAL_OPTIONS[words[0]] else words[1:]
    if not words or words[0].startswith("-"):
        return None if not words or words[0] in GLOBAL_OPTIONS else f"unknown {words[0]}"
    name, rest = words[0], " ".join(words[1:])
    if name not in commands:
        return f"no command {name!r}"
    unknown = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest)) - commands[name])
    return f"{name}: no option {', '.join(unknown)}" if unknown else None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_line_in_the_docs_names_a_real_command_and_options(page: Path) -> None:
    commands = cli_commands()
    wrong = {t: why for t in command_lines(page) if (why := check_command_line(t, commands))}
    assert wrong == {}, f"{page.relative_to(ROOT)}: {wrong}"


def test_the_command_line_checker_catches_typos(tmp_path: Path) -> None:
    commands = {"runs": {"--status", "--help"}}
    assert check_command_line("--backend URL runs --status x", commands) is None
    assert check_command_line("--json runs", commands) is None
    assert check_command_line("--help", commands) is None
    assert check_command_line("run", commands) == "no command 'run'"
    assert check_command_line("runs --stats x", commands) == "runs: no option --stats"
    page = (
        "```console\n$ substantial --json runs\n```\n`substantial logs ID -f`, `substantial.http`\n"
    )
    path = tmp_path / "page.md"
    path.write_text(page)
    assert command_lines(path) == ["--json runs", "logs ID -f"]


def test_the_cli_reference_has_a_section_for_every_command_and_no_other() -> None:
    sections = set(re.findall(r"^## `([a-z-]+)`$", CLI_REF.read_text(), re.M))
    assert sections == set(cli_commands())


def reference_routes() -> dict[tuple[str, str], set[str]]:
    """The HTTP reference's route table: (method, path with {} for each parameter)
    -> the status codes it lists."""
    text = HTTP_REF.read_text()
    table = text[text.index("| route | answers |") :].split("\n\n", 1)[0]
    rows: dict[tuple[str, str], set[str]] = {}
    for line in table.splitlines()[2:]:
        route, answers = line.strip("|").split("|")[:2]
        m = re.search(r"`(GET|POST) (/\S+)`", route)
        assert m is not None, line
        rows[(m.group(1), re.sub(r"\{[^}]+\}", "{}", m.group(2)))] = set(
            re.findall(r"\b[1-5]\d\d\b", answers)
        )
    return rows


def test_the_http_reference_lists_every_route_with_the_openapi_status_codes() -> None:
    """Every route of the API (not the dashboard's pages) is in the table, with
    the codes the OpenAPI document gives it, but for the 401 and 503 that every
    ``/api`` route may answer (said once under the table)."""
    from substantial.http._openapi import document

    expected: dict[tuple[str, str], set[str]] = {}
    for path, ops in document(secured=True)["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"]) - {"401"}
            if path.startswith("/api/"):
                codes -= {"503"}
            expected[(method.upper(), re.sub(r"\{[^}]+\}", "{}", path))] = codes
    assert reference_routes() == expected


def test_the_openapi_document_has_every_route_the_app_serves() -> None:
    from substantial import Conductor
    from substantial.http import create_app

    app = create_app(Conductor("memory://"))
    served = {
        (method, re.sub(r"\{[^}]+\}", "{}", route.path))
        for route in app.routes
        if isinstance(route, Route)
        and not route.path.startswith(("/ui", "/runs"))
        and route.path != "/"
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert served == set(reference_routes())


# -- operate in production: the check for runs no worker serves --------------------------


async def test_the_unserved_runs_check_runs_as_written() -> None:
    from substantial import Conductor, Context, RunStatus, workflow

    from .engine.helpers import eventually, worker

    [block] = [b for b in python_blocks(OPERATE) if "async def unserved_pending" in b.code]
    namespace = run_blocks([block], OPERATE)
    unserved_pending = namespace["unserved_pending"]

    gate = asyncio.Event()

    @workflow()
    async def served(c: Context) -> None:
        await c.save(gate.wait)  # holds the worker's only slot

    async with Conductor("memory://") as conductor:
        conductor.register(served)
        async with worker(conductor, concurrency=1):
            await eventually(conductor.workers)  # the worker registers as it starts
            busy = await conductor.start(served)
            await eventually(lambda: _status_is(busy, RunStatus.RUNNING))
            waiting = await conductor.start(served)  # served, but no free slot: PENDING
            typo = await conductor.start("sevred")
            elsewhere = await conductor.start(served, queue="nobody")
            unserved = await unserved_pending(conductor)
            assert await waiting.status() == RunStatus.PENDING
            gate.set()
    assert sorted(unserved) == sorted([typo.run_id, elsewhere.run_id])


async def _status_is(handle: Any, status: Any) -> bool:
    return bool(await handle.status() == status)
