"""Drive ``substantial`` in subprocesses (``python -m substantial``) on real stores.

Each test gets an isolated store: a SQLite file under tmp_path, or a fresh
PostgreSQL schema dropped afterwards. ``cli(...)`` runs one command against it;
``workers.start(...)`` keeps ``substantial worker`` processes running for the test
and stops them (SIGTERM, exit 0 expected) at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from substantial.backends import open_backend

from ..backends import unavailable, url_for

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.cli.app:conductor"
STORES = ["sqlite", "postgres"]
# The CLI is the same code on every store; these tests add S3 to a few that cross it
# (each S3 command pays for aiobotocore's import and real round trips).
WITH_S3 = pytest.mark.parametrize("store", [*STORES, "s3"], indirect=True)


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This checkout's code (src/, and tests/ for the app module) wins in the child."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSTANTIAL_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")) if p
    )
    env.update(extra or {})
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "substantial", *args]


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args),
        cwd=cwd,
        env=cli_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single line a failing command prints on stderr (and never a traceback)."""
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll another process's visible state (there is no event to await across them)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Store:
    kind: str
    url: str
    tmp: Path

    def cli(
        self, *args: str, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``substantial --backend URL ARGS...``"""
        return run_cli("--backend", self.url, *args, cwd=self.tmp, env=env, timeout=timeout)

    def ok(self, *args: str) -> str:
        proc = self.cli(*args)
        assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout


async def _check_and_drop(url: str, *, drop: bool) -> None:
    backend = open_backend(url)
    await backend.open()
    try:
        dropper = getattr(backend, "drop_everything", None)
        if drop and dropper is not None:
            await dropper()
    finally:
        await backend.close()


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    kind: str = request.param
    url, _ = url_for(kind, tmp_path)
    if kind in ("postgres", "s3"):
        try:
            asyncio.run(_check_and_drop(url, drop=False))
        except Exception as exc:
            unavailable(kind, exc)
    yield Store(kind=kind, url=url, tmp=tmp_path)
    if kind in ("postgres", "s3"):
        asyncio.run(_check_and_drop(url, drop=True))


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Store:
    url, _ = url_for("sqlite", tmp_path)
    return Store(kind="sqlite", url=url, tmp=tmp_path)


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    err: Path

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@dataclass
class Workers:
    """``substantial worker`` processes of one test; stopped at its end."""

    store: Store
    all: list[Proc] = field(default_factory=list)

    def spawn(self, *args: str, backend: bool = True) -> Proc:
        err = self.store.tmp / f"worker-{len(self.all)}.err"
        head = ["--backend", self.store.url] if backend else []
        with err.open("wb") as e:
            proc = subprocess.Popen(
                command(*head, "worker", *args),
                cwd=self.store.tmp,
                env=cli_env({"SUBSTANTIAL_BACKEND": self.store.url}),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=e,
            )
        worker = Proc(proc, err)
        self.all.append(worker)
        return worker

    def start(self, *args: str, backend: bool = True) -> Proc:
        """A worker, once it logged that it serves (its hints subscribed, claiming)."""
        worker = self.spawn(*(args or (APP,)), backend=backend)
        wait_until(lambda: " started: " in worker.stderr() or worker.proc.poll() is not None,
                   "the worker to start")  # fmt: skip
        assert worker.proc.poll() is None, worker.stderr()
        return worker

    def stop_all(self) -> None:
        for w in self.all:
            if w.proc.poll() is None:
                code = w.signal(signal.SIGTERM)
                assert code == 0, w.stderr()


@pytest.fixture
def workers(store: Store) -> Iterator[Workers]:
    ws = Workers(store)
    try:
        yield ws
    finally:
        ws.stop_all()
