"""Usage and input errors: exit 2 and one line on stderr naming the problem."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT, Store, Workers, cli_env, one_error_line, run_cli


def fails(store: Store, *args: str, code: int = 2) -> str:
    proc = store.cli(*args)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    return one_error_line(proc)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["start", "double", "--kwargs", "{n: 1}"], "--kwargs is not valid JSON"),
        (["start", "double", "--kwargs", "[1, 2]"], "--kwargs must be a JSON object"),
        (["send", "some-run", "decision", "{oops"], "payload is not valid JSON"),
        (["runs", "--filter", "{not json"], "invalid filter at <root>: not valid JSON"),
        (["runs", "--filter", '{"and": [{"eq": 1}, {"gt": 1, "lt": 2}]}'], "at and[1]"),
        (["runs", "--filter", '{"not": {"status": {"like": "x"}}}'], "not.status"),
        (["runs", "--status", "SLEEPY"], "--status"),
        (["runs", "--limit", "0"], "--limit"),
        (["runs", "--cursor", "not-a-cursor"], "cursor"),
        (["start", "double", "--timeout", "3"], "--timeout needs --wait"),
        (["runs", "--bogus"], "No such option: --bogus"),
        (["result"], "Missing argument"),
        (["frobnicate"], "frobnicate"),
        ([], "Missing command"),
    ],
)
def test_bad_input_is_exit_2_with_one_line(sqlite_store: Store, args: list[str], says: str) -> None:
    assert says in fails(sqlite_store, *args)


@pytest.mark.parametrize(
    "args",
    [
        ["result", "no-such-run"],
        ["result", "no-such-run", "--timeout", "5"],
        ["send", "no-such-run", "decision", "1"],
        ["cancel", "no-such-run"],
        ["logs", "no-such-run"],
        ["logs", "no-such-run", "--follow"],
    ],
)
def test_an_unknown_run_is_exit_2(store: Store, args: list[str]) -> None:
    assert "no run with id 'no-such-run'" in fails(store, *args)


def test_sending_to_a_finished_run_is_exit_2(store: Store, workers: Workers) -> None:
    workers.start()
    run_id = store.ok("start", "double").strip()
    store.ok("result", run_id, "--timeout", "30")
    assert "already finished" in fails(store, "send", run_id, "decision", "1")


@pytest.mark.parametrize("command", [["runs"], ["result", "r"], ["start", "double"], ["migrate"]])
def test_an_unreachable_store_is_exit_2_and_never_shows_the_password(
    sqlite_store: Store, command: list[str]
) -> None:
    url = "postgresql://admin:s3cr3t-pw@127.0.0.1:1/db"
    proc = run_cli("--backend", url, *command, cwd=sqlite_store.tmp)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "unavailable" in line and "127.0.0.1:1" in line
    assert "s3cr3t-pw" not in proc.stderr + proc.stdout


def test_an_unreachable_store_from_the_environment_is_exit_2(sqlite_store: Store) -> None:
    env = {"SUBSTANTIAL_BACKEND": "redis://:hunter2-pw@127.0.0.1:1/0"}
    proc = run_cli("runs", cwd=sqlite_store.tmp, env=env)
    assert proc.returncode == 2
    assert "redis://***@127.0.0.1:1/0" in one_error_line(proc)
    assert "hunter2-pw" not in proc.stderr


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://u:pw-in-url@127.0.0.1/db?bogus=1", "unknown postgresql:// URL option"),
        ("sqlite:///x.db?poll_interval=-1", "'poll_interval' has an invalid value"),
        ("nosuch://x", "unknown store URL scheme"),
    ],
)
def test_a_bad_store_url_is_exit_2(sqlite_store: Store, url: str, says: str) -> None:
    proc = run_cli("--backend", url, "runs", cwd=sqlite_store.tmp)
    assert proc.returncode == 2
    assert says in one_error_line(proc)
    assert "pw-in-url" not in proc.stderr


def test_an_internal_error_is_one_line_and_exit_3(sqlite_store: Store) -> None:
    """A bug (not a SubstantialError) is still one line, with its own exit code."""
    module = sqlite_store.tmp / "buggy_startup.py"
    module.write_text(
        "import substantial.cli._runs as r\n"
        "def broken(*a, **k):\n"
        "    raise ZeroDivisionError('division by zero')\n"
        "r.parse_filter_json = broken\n"
        "from substantial.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, str(module), "--backend", sqlite_store.url, "runs", "--filter", "{}"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert one_error_line(proc) == "error: internal error: ZeroDivisionError: division by zero"
