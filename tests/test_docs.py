"""The docs' code runs as written: blocks are read from the markdown at test time,
so a page and its test cannot drift apart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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
