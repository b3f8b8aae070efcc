"""``substantial lint`` in subprocesses: one finding per line on stdout, exit 0 when
clean, 1 when anything is found, 2 for an input it cannot read; and the examples
and the docs' workflows are clean (a counterexample marked ``# don't`` is caught)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import textwrap
from pathlib import Path

from .conftest import ROOT, one_error_line, run_cli

CLEAN = """
from datetime import timedelta

from substantial import Context, workflow


@workflow()
async def order(c: Context, item: str) -> str:
    at = await c.now()
    await c.sleep(timedelta(minutes=5))
    return await c.save(lambda: f"{item} at {at.isoformat()}")
"""

DIRTY = """
import asyncio
import os
import time

from substantial import Context, workflow


@workflow()
async def order(c: Context, item: str) -> str:
    region = os.environ["REGION"]
    deadline = time.time() + 6
    while time.time() < deadline:
        await asyncio.sleep(1)
    return region
"""


def lint(
    tmp: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``substantial ARGS...`` run in ``tmp``."""
    return run_cli(*args, cwd=tmp, env=env)


def module(tmp: Path, name: str, source: str) -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def test_a_clean_module_exits_0_and_prints_nothing(tmp_path: Path) -> None:
    module(tmp_path, "flows.py", CLEAN)
    proc = lint(tmp_path, "lint", "flows.py")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_each_finding_is_one_line_and_any_finding_exits_1(tmp_path: Path) -> None:
    module(tmp_path, "flows.py", DIRTY)
    proc = lint(tmp_path, "lint", "flows.py")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [
        "flows.py:10:14: SUB004 os.environ reads the environment, which may differ on the "
        "worker that replays — use workflow kwargs, or read it inside c.save(...)",
        "flows.py:11:16: SUB001 time.time() reads the clock: a replay sees another time"
        " — use await c.now()",
        "flows.py:12:11: SUB001 time.time() in a while condition reads the clock: a replay "
        "loops another number of times, which the run-time determinism check cannot catch"
        " — use await c.now()",
        "flows.py:13:15: SUB006 asyncio.sleep() is not a durable timer: the wait is lost when "
        "the worker stops — use await c.sleep(...)",
    ]


def test_json_prints_the_findings_as_a_list(tmp_path: Path) -> None:
    module(tmp_path, "flows.py", DIRTY)
    for args in (["--json", "lint", "flows.py"], ["lint", "flows.py", "--json"]):
        proc = lint(tmp_path, *args)
        assert proc.returncode == 1, proc.stderr
        found = json.loads(proc.stdout)
        assert [(f["line"], f["code"]) for f in found] == [
            (10, "SUB004"), (11, "SUB001"), (12, "SUB001"), (13, "SUB006")
        ]  # fmt: skip
        assert found[0] == {
            "path": "flows.py",
            "line": 10,
            "col": 14,
            "code": "SUB004",
            "message": "os.environ reads the environment, which may differ on the worker "
            "that replays",
            "alternative": "workflow kwargs, or read it inside c.save(...)",
        }
    clean = lint(tmp_path, "--json", "lint", module(tmp_path, "ok.py", CLEAN).name)
    assert (clean.returncode, json.loads(clean.stdout)) == (0, [])


def test_a_module_name_is_found_from_the_current_directory_without_running_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("raise SystemExit('imported')\n")
    module(tmp_path / "shop", "flows.py", DIRTY)
    proc = lint(tmp_path, "lint", "shop.flows")
    assert proc.returncode == 1, proc.stderr
    assert [line.split(": ")[1].split()[0] for line in proc.stdout.splitlines()] == [
        "SUB004", "SUB001", "SUB001", "SUB006"
    ]  # fmt: skip
    assert proc.stdout.startswith("shop/flows.py:10:14: ")


def test_lint_opens_no_store(tmp_path: Path) -> None:
    """An unreachable store (given or from the environment) does not matter."""
    module(tmp_path, "flows.py", CLEAN)
    unreachable = "postgresql://nobody@127.0.0.1:9/none"
    proc = lint(
        tmp_path, "--backend", unreachable, "lint", "flows.py",
        env={"SUBSTANTIAL_BACKEND": unreachable},
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")


def test_a_missing_path_or_module_is_exit_2_with_one_line(tmp_path: Path) -> None:
    module(tmp_path, "flows.py", CLEAN)
    proc = lint(tmp_path, "lint", "flows.py", "missing.py")
    assert proc.returncode == 2
    assert one_error_line(proc) == "error: no such file or directory: missing.py"
    assert proc.stdout == ""
    proc = lint(tmp_path, "lint", "no_such.module")
    assert proc.returncode == 2
    assert one_error_line(proc) == "error: no such file, directory or module: no_such.module"


def test_a_file_that_does_not_parse_is_exit_2_with_one_line(tmp_path: Path) -> None:
    module(tmp_path, "broken.py", "def order(:\n")
    proc = lint(tmp_path, "lint", "broken.py")
    assert proc.returncode == 2
    assert re.fullmatch(r"error: broken\.py:1:\d+: syntax error: .+", one_error_line(proc))


def test_no_argument_is_a_usage_error(tmp_path: Path) -> None:
    proc = lint(tmp_path, "lint")
    assert proc.returncode == 2
    assert "MODULE..." in one_error_line(proc)


# -- our own code is clean ---------------------------------------------------------------


def test_the_examples_are_clean() -> None:
    proc = run_cli("lint", "examples/", cwd=ROOT)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def doc_workflows() -> list[tuple[str, int, str]]:
    """Each ```python block of README.md and docs/**/*.md that parses on its own and
    defines a workflow: (page, first line, code)."""
    found: list[tuple[str, int, str]] = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        fence: str | None = None
        body: list[str] = []
        start = 0
        for n, line in enumerate(page.read_text().splitlines(), start=1):
            if fence is None:
                if m := re.match(r"^(```+)\s*python\s*$", line):
                    fence, start, body = m.group(1), n + 1, []
            elif line.strip() == fence:
                code = "\n".join(body) + "\n"
                if defines_workflow(code):
                    found.append((page.relative_to(ROOT).as_posix(), start, code))
                fence = None
            else:
                body.append(line)
    return found


def defines_workflow(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False  # a fragment (a signature, a line of a session)
    return any(
        isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)
        and any(decorator_name(d) == "workflow" for d in node.decorator_list)
        for node in ast.walk(tree)
    )


def decorator_name(d: ast.expr) -> str | None:
    """``workflow`` for ``@workflow``, ``@workflow(...)`` and ``@substantial.workflow()``."""
    target = d.func if isinstance(d, ast.Call) else d
    if isinstance(target, ast.Name):
        return target.id
    return target.attr if isinstance(target, ast.Attribute) else None


def test_every_workflow_in_the_docs_is_clean_and_each_counterexample_is_caught(
    tmp_path: Path,
) -> None:
    """A block whose first line is ``# don't`` shows what not to do: it must be flagged."""
    blocks = doc_workflows()
    assert len(blocks) >= 10, blocks  # the extraction found the docs' workflows
    for kind in ("do", "dont"):
        (tmp_path / kind).mkdir()
    for page, start, code in blocks:
        kind = "dont" if code.startswith("# don't") else "do"
        name = re.sub(r"\W", "_", page.removesuffix(".md")) + f"_line{start}.py"
        # as many blank lines as the page has above the block: findings name its lines
        (tmp_path / kind / name).write_text("\n" * (start - 1) + code)
    proc = run_cli("lint", "do", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    counterexamples = sorted((tmp_path / "dont").iterdir())
    assert counterexamples, "docs/concepts/determinism.md has a # don't block"
    for path in counterexamples:
        proc = run_cli("lint", str(path.relative_to(tmp_path)), cwd=tmp_path)
        assert proc.returncode == 1, (path.name, proc.stdout, proc.stderr)
