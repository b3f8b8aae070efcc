"""Spec of the determinism lint (substantial.lint): what it flags in a workflow body,
how it resolves imports, and what it leaves alone (the callables given to ``save``,
code outside workflows)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from substantial.lint import CODES, Finding, LintError, lint_paths, lint_source

HEAD = "from substantial import Context, workflow\n"


def lint(source: str) -> list[Finding]:
    return lint_source(textwrap.dedent(source).lstrip(), "flows.py")


def flagged(body: str, imports: str = "") -> list[tuple[str, str]]:
    """(code, message) of each finding in a workflow whose body is ``body``."""
    source = f"{HEAD}{imports}\n\n@workflow()\nasync def wf(c: Context) -> object:\n"
    source += textwrap.indent(textwrap.dedent(body).strip() + "\n", "    ")
    return [(f.code, f.message) for f in lint_source(source, "flows.py")]


def codes(body: str, imports: str = "") -> list[str]:
    return [code for code, _ in flagged(body, imports)]


# -- the report ----------------------------------------------------------------------


def test_a_finding_names_file_line_column_code_and_the_durable_alternative() -> None:
    [finding] = lint(
        """
        import time
        from substantial import Context, workflow

        @workflow()
        async def wf(c: Context) -> float:
            return time.time()
        """
    )
    assert finding == Finding(
        path="flows.py",
        line=6,
        col=12,
        code="SUB001",
        message="time.time() reads the clock: a replay sees another time",
        alternative="await c.now()",
    )
    assert str(finding) == (
        "flows.py:6:12: SUB001 time.time() reads the clock: a replay sees another time"
        " — use await c.now()"
    )


def test_findings_come_in_line_order() -> None:
    found = lint_source(
        f"import time, uuid\n{HEAD}\n@workflow()\nasync def wf(c: Context) -> None:\n"
        "    a = uuid.uuid4()\n    b = time.time()\n",
        "flows.py",
    )
    assert [(f.line, f.code) for f in found] == [(6, "SUB003"), (7, "SUB001")]


def test_every_code_has_its_alternative() -> None:
    assert CODES == {
        "SUB001": "await c.now()",
        "SUB002": "await c.random(), or a value computed inside c.save(...)",
        "SUB003": "await c.uuid4()",
        "SUB004": "workflow kwargs, or read it inside c.save(...)",
        "SUB005": "c.save(...) around it",
        "SUB006": "await c.sleep(...)",
    }


# -- the rules, one construct each ----------------------------------------------------

CLOCK = [
    ("import time", "time.time()", "time.time()"),
    ("import time", "time.time_ns()", "time.time_ns()"),
    ("import time", "time.monotonic()", "time.monotonic()"),
    ("import time", "time.perf_counter()", "time.perf_counter()"),
    ("from datetime import datetime", "datetime.now()", "datetime.datetime.now()"),
    ("from datetime import datetime", "datetime.utcnow()", "datetime.datetime.utcnow()"),
    ("from datetime import datetime", "datetime.today()", "datetime.datetime.today()"),
    ("from datetime import date", "date.today()", "datetime.date.today()"),
    ("import datetime", "datetime.datetime.now()", "datetime.datetime.now()"),
    ("import datetime", "datetime.date.today()", "datetime.date.today()"),
]


@pytest.mark.parametrize(("imports", "expr", "shown"), CLOCK, ids=[c[1] for c in CLOCK])
def test_reading_the_clock_is_SUB001(imports: str, expr: str, shown: str) -> None:
    assert flagged(f"return {expr}", imports) == [
        ("SUB001", f"{shown} reads the clock: a replay sees another time")
    ]


def test_a_clock_function_passed_around_is_flagged_too() -> None:
    assert codes("return sorted([1], key=lambda _: time.time())", "import time") == ["SUB001"]
    assert codes("clock = time.monotonic\nreturn clock()", "import time") == ["SUB001"]


@pytest.mark.parametrize(
    ("imports", "expr"),
    [
        ("import random", "random.random()"),
        ("import random", "random.choice([1, 2])"),
        ("import random", "random.shuffle(xs)"),
        ("import random", "random.Random()"),
        ("from random import randint", "randint(1, 6)"),
        ("from random import choice as pick", "pick([1, 2])"),
        ("import secrets", "secrets.token_hex()"),
        ("import os", "os.urandom(8)"),
    ],
)
def test_randomness_is_SUB002(imports: str, expr: str) -> None:
    assert codes(f"xs = [1, 2]\nreturn {expr}", imports) == ["SUB002"]


def test_a_seeded_generator_is_deterministic_and_not_flagged() -> None:
    assert codes("return random.Random(42).random()", "import random") == []
    assert codes("return Random(42).random()", "from random import Random") == []


@pytest.mark.parametrize("expr", ["uuid.uuid4()", "uuid.uuid1()"])
def test_new_uuids_are_SUB003(expr: str) -> None:
    assert flagged(f"return {expr}", "import uuid") == [
        ("SUB003", f"{expr} makes a new id on every replay")
    ]


def test_name_based_uuids_are_deterministic_and_not_flagged() -> None:
    assert codes("return uuid.uuid5(uuid.NAMESPACE_URL, 'x')", "import uuid") == []


@pytest.mark.parametrize(
    ("imports", "expr", "shown"),
    [
        ("import os", "os.environ['REGION']", "os.environ"),
        ("import os", "os.environ.get('REGION')", "os.environ"),
        ("import os", "'REGION' in os.environ", "os.environ"),
        ("import os", "os.getenv('REGION')", "os.getenv()"),
        ("from os import environ", "environ['REGION']", "os.environ"),
    ],
)
def test_reading_the_environment_is_SUB004(imports: str, expr: str, shown: str) -> None:
    assert flagged(f"return {expr}", imports) == [
        ("SUB004", f"{shown} reads the environment, which may differ on the worker that replays")
    ]


IO = [
    ("", "open('orders.csv').read()", "open()"),
    ("from pathlib import Path", "Path('a.txt').read_text()", "Path(...).read_text()"),
    ("from pathlib import Path", "Path('a.txt').write_text('x')", "Path(...).write_text()"),
    ("from pathlib import Path", "Path('a.bin').read_bytes()", "Path(...).read_bytes()"),
    ("from pathlib import Path", "Path('a.bin').write_bytes(b'')", "Path(...).write_bytes()"),
    ("from pathlib import Path", "Path('a.txt').open()", "Path(...).open()"),
    ("import pathlib", "pathlib.Path('a.txt').read_text()", "Path(...).read_text()"),
    ("from pathlib import Path", "(Path('d') / 'a.txt').read_text()", "Path(...).read_text()"),
    ("import socket", "socket.create_connection(('db', 5432))", "socket.create_connection()"),
    ("import requests", "requests.get('https://api')", "requests.get()"),
    ("import httpx", "httpx.post('https://api')", "httpx.post()"),
    ("import httpx", "httpx.AsyncClient()", "httpx.AsyncClient()"),
    ("import aiohttp", "aiohttp.ClientSession()", "aiohttp.ClientSession()"),
    ("import urllib.request", "urllib.request.urlopen('https://api')", "urllib.request.urlopen()"),
    ("from urllib.request import urlopen", "urlopen('https://api')", "urllib.request.urlopen()"),
    ("import subprocess", "subprocess.run(['ls'])", "subprocess.run()"),
    ("import os", "os.system('ls')", "os.system()"),
]


@pytest.mark.parametrize(("imports", "expr", "shown"), IO, ids=[c[1] for c in IO])
def test_file_network_and_process_io_is_SUB005(imports: str, expr: str, shown: str) -> None:
    assert flagged(f"return {expr}", imports) == [
        ("SUB005", f"{shown} does I/O, again on every replay")
    ]


def test_a_path_kept_in_a_variable_is_followed_to_its_io() -> None:
    assert codes("p = Path('a.txt')\nreturn p.read_text()", "from pathlib import Path") == [
        "SUB005"
    ]
    annotated = "p: Path = Path('a.txt')\nreturn p.read_bytes()"
    assert codes(annotated, "from pathlib import Path") == ["SUB005"]
    module_level = "from pathlib import Path\nDATA = Path('data')"
    assert codes("return (DATA / 'a.txt').read_text()", module_level) == ["SUB005"]


def test_path_arithmetic_without_io_is_fine() -> None:
    assert codes("return str(Path('d') / 'a.txt')", "from pathlib import Path") == []


def test_names_of_io_modules_that_are_not_calls_are_fine_in_a_body() -> None:
    body = """
    try:
        return await c.save(lambda: httpx.get("https://api").text)
    except httpx.HTTPError:
        return subprocess.PIPE
    """
    assert codes(body, "import httpx, subprocess") == []


def test_asyncio_sleep_is_SUB006() -> None:
    assert flagged("await asyncio.sleep(60)", "import asyncio") == [
        ("SUB006", "asyncio.sleep() is not a durable timer: the wait is lost when the worker stops")
    ]


# -- the deadline loop the run-time check cannot catch --------------------------------


def test_a_deadline_and_a_while_loop_on_the_clock_are_both_flagged() -> None:
    found = lint(
        """
        import time
        from substantial import Context, workflow

        @workflow()
        async def poll(c: Context) -> int:
            deadline = time.time() + 6
            tries = 0
            while time.time() < deadline:
                tries += 1
            return tries
        """
    )
    assert [(f.line, f.code) for f in found] == [(6, "SUB001"), (8, "SUB001")]
    assert "while condition" not in found[0].message
    assert found[1].message == (
        "time.time() in a while condition reads the clock: a replay loops another number "
        "of times, which the run-time determinism check cannot catch"
    )


# -- import aliases --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("imports", "expr"),
    [
        ("import time as t", "t.time()"),
        ("from time import time", "time()"),
        ("from time import monotonic as now", "now()"),
        ("import datetime as dt", "dt.datetime.now()"),
        ("from datetime import datetime as DT", "DT.now()"),
    ],
)
def test_import_aliases_are_resolved(imports: str, expr: str) -> None:
    assert codes(f"return {expr}", imports) == ["SUB001"]


def test_an_import_inside_the_workflow_body_counts() -> None:
    assert codes("import random as r\nreturn r.random()") == ["SUB002"]


def test_a_local_name_that_shadows_a_module_is_not_the_module() -> None:
    assert codes("random = await c.random()\nreturn random.hex()", "import random") == []


def test_a_name_of_another_module_is_not_confused_with_the_rules() -> None:
    imports = "from mytime import time\nimport myrandom as random"
    assert codes("return time(), random.choice([1])", imports) == []


def test_an_unimported_module_name_in_a_snippet_is_taken_for_that_module() -> None:
    assert codes("return datetime.now().hour") == ["SUB001"]


# -- what a workflow body is -------------------------------------------------------------


@pytest.mark.parametrize(
    "decorator", ["@workflow", "@workflow()", "@workflow(name='w')", "@substantial.workflow()"]
)
def test_every_form_of_the_workflow_decorator_marks_a_body(decorator: str) -> None:
    source = f"import substantial, time\n{HEAD}\n{decorator}\nasync def wf(c):\n    time.time()\n"
    assert [f.code for f in lint_source(source, "flows.py")] == ["SUB001"]


def test_functions_outside_workflow_bodies_are_not_checked() -> None:
    found = lint(
        """
        import time
        from substantial import workflow

        def charge() -> float:
            return time.time()

        async def main() -> float:
            return time.time()

        @other.decorator
        async def not_a_workflow() -> float:
            return time.time()
        """
    )
    assert found == []


def test_a_workflow_defined_inside_a_function_is_checked() -> None:
    found = lint(
        """
        from substantial import workflow

        def make():
            import uuid

            @workflow()
            async def wf(c):
                return uuid.uuid4()

            return wf
        """
    )
    assert [f.code for f in found] == ["SUB003"]


def test_a_nested_helper_not_passed_to_save_is_part_of_the_body() -> None:
    body = """
    def stamp() -> float:
        return time.time()
    return stamp()
    """
    assert codes(body, "import time") == ["SUB001"]


def test_a_helper_used_in_the_body_and_in_save_is_part_of_the_body() -> None:
    body = """
    def stamp() -> float:
        return time.time()
    await c.save(stamp)
    return stamp()
    """
    assert codes(body, "import time") == ["SUB001"]


def test_handle_callbacks_and_ensure_predicates_run_on_every_replay_and_are_checked() -> None:
    body = """
    c.handle("ping", lambda _: print(time.time()))
    await c.ensure(lambda: os.path.exists("/tmp/go") or "GO" in os.environ)
    """
    assert codes(body, "import os, time") == ["SUB001", "SUB004"]


# -- the callables given to save are not the body ------------------------------------------


def test_a_lambda_given_to_save_is_excluded() -> None:
    assert codes("return await c.save(lambda: requests.get('https://api').json())",
                 "import requests") == []  # fmt: skip


def test_a_function_given_to_save_by_name_is_excluded() -> None:
    body = """
    async def charge() -> str:
        return httpx.post("https://pay", json={"at": time.time()}).text

    def receipt() -> str:
        return open("receipt.txt").read()

    await c.save(charge)
    return await c.save(receipt, name="receipt")
    """
    assert codes(body, "import httpx, time") == []


def test_compensate_with_is_excluded_as_a_lambda_and_by_name() -> None:
    body = """
    def refund() -> None:
        requests.post("https://pay/refund")

    await c.save(lambda: 1, compensate_with=lambda: requests.post("https://pay/void"))
    await c.save(lambda: 2, compensate_with=refund)
    """
    assert codes(body, "import requests") == []


def test_a_helper_called_only_from_a_save_callable_is_excluded() -> None:
    body = """
    def fetch(url: str) -> str:
        return urlopen(url).read()

    def fetch_all() -> list[str]:
        return [fetch(u) for u in ("a", "b")]

    await c.save(lambda: fetch("https://api"))
    return await c.save(fetch_all)
    """
    assert codes(body, "from urllib.request import urlopen") == []


def test_a_function_passed_to_save_as_it_is_runs_inside_save() -> None:
    body = """
    started = await c.save(time.time)
    return await c.save(functools.partial(subprocess.run, ["ls"]))
    """
    assert codes(body, "import functools, subprocess, time") == []


def test_a_lambda_default_is_evaluated_in_the_body_and_is_flagged() -> None:
    assert codes("return await c.save(lambda at=time.time(): at)", "import time") == ["SUB001"]


def test_only_the_callable_of_save_is_excluded_not_its_other_arguments() -> None:
    assert codes("await c.save(lambda: 1, key=str(uuid.uuid4()))", "import uuid") == ["SUB003"]


def test_a_lambda_given_to_another_function_is_part_of_the_body() -> None:
    assert codes("run = lambda: time.time()\nreturn run()", "import time") == ["SUB001"]


# -- inputs ----------------------------------------------------------------------------


def test_a_syntax_error_is_a_lint_error_naming_the_file_and_line() -> None:
    with pytest.raises(LintError, match=r"^flows\.py:2:\d+: syntax error: "):
        lint_source("x = 1\ndef broken(:\n", "flows.py")


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEAD + "import time\n\n@workflow()\nasync def wf(c):\n" + source)
    return path


def test_a_directory_is_searched_for_python_files_recursively_skipping_hidden_ones(
    tmp_path: Path,
) -> None:
    write(tmp_path / "a.py", "    return time.time()\n")
    write(tmp_path / "pkg" / "b.py", "    return time.monotonic()\n")
    write(tmp_path / ".venv" / "c.py", "    return time.time()\n")
    (tmp_path / "notes.txt").write_text("time.time()")
    found = lint_paths([tmp_path])
    assert [Path(f.path).relative_to(tmp_path).as_posix() for f in found] == ["a.py", "pkg/b.py"]


def test_a_module_name_is_found_on_the_search_path_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    init = f"open({str(marker)!r}, 'w').close()\n"
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text(init)
    write(tmp_path / "shop" / "flows.py", f"    return time.time()\n{init}")
    found = lint_paths(["shop.flows"], search_path=[str(tmp_path)])
    assert [(Path(f.path).name, f.code) for f in found] == [("flows.py", "SUB001")]
    assert [Path(f.path).name for f in lint_paths(["shop"], search_path=[str(tmp_path)])] == [
        "flows.py"
    ]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ("missing.py", "no such file or directory: missing.py"),
        ("dir/missing", "no such file or directory: dir/missing"),
        ("no_such_module", "no such file, directory or module: no_such_module"),
        ("single.sub", "no such module: single.sub (single is not a package)"),
        ("sys", "module sys is built in: it has no Python source to check"),
    ],
)
def test_a_path_or_module_that_does_not_exist_is_a_lint_error(
    tmp_path: Path, given: str, error: str
) -> None:
    (tmp_path / "single.py").write_text("")
    with pytest.raises(LintError, match=f"^{re.escape(error)}$"):
        lint_paths([given], search_path=[str(tmp_path)])


def test_a_file_that_does_not_parse_is_a_lint_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def (:\n")
    with pytest.raises(LintError, match=r"bad\.py:1:\d+: syntax error: "):
        lint_paths([bad])
