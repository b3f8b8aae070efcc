"""Throw-away Redis and PostgreSQL servers that a test may kill and restart.

Redis runs with ``appendonly yes`` and ``appendfsync always`` so its data
survives a restart. PostgreSQL gets a fresh cluster (initdb) in a directory
under /tmp; as root, initdb and postgres run as the ``postgres`` user through
``runuser`` (they refuse to run as root). ``fsync=off``: the tests restart the
server *process* (committed data survives through the WAL in the OS cache), they
do not simulate power loss.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RedisServer:
    """``redis-server`` on a spare port, persisting every write to its AOF."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not on PATH")
        cmd = [
            exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
            "--daemonize", "no", "--logfile", str(self.log),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{self._log_tail()}")
            time.sleep(0.02)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL (a crash); AOF with appendfsync always keeps every acknowledged write."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        self.kill()


class PostgresServer:
    """A fresh PostgreSQL cluster on a spare port (TCP on 127.0.0.1, trust auth)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "pgdata"
        self.sockets = root / "sock"
        self.logfile = root / "postgres.log"
        self.port = free_port()
        bindir = next((d for d in PG_BIN_DIRS if os.path.exists(f"{d}/initdb")), None)
        if bindir is None:
            raise FileNotFoundError("initdb not found in " + ", ".join(PG_BIN_DIRS))
        self.bin = bindir
        self.as_root = os.geteuid() == 0
        if self.as_root:
            if shutil.which("runuser") is None:
                raise FileNotFoundError("runuser is needed to run postgres as root")
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chmod(root, 0o755)
            for d in (self.data, self.sockets):
                d.mkdir(mode=0o700 if d == self.data else 0o755)
                os.chown(d, pw.pw_uid, pw.pw_gid)
            self.logfile.touch()
            os.chown(self.logfile, pw.pw_uid, pw.pw_gid)
        else:
            self.data.mkdir(mode=0o700)
            self.sockets.mkdir()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        cmd = list(args)
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd=self.root,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({done.returncode}):\n"
                f"{done.stdout.decode(errors='replace')}\n{done.stderr.decode(errors='replace')}\n"
                f"{self.log_tail()}"
            )

    def log_tail(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def init(self) -> None:
        self._run(
            f"{self.bin}/initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=200"
        )
        self._run(
            f"{self.bin}/pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )
        deadline = time.monotonic() + 30
        while not _port_open(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres is not listening:\n{self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """Immediate shutdown: like a crash, recovery replays the WAL on the next start."""
        self._run(f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(
                f"{self.bin}/pg_ctl",
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "-w",
                "stop",
                timeout=30,
            )


def make_root() -> Path:
    """A directory the postgres user can reach (pytest's tmp_path is private to root)."""
    return Path(tempfile.mkdtemp(prefix="substantial-it-", dir="/tmp"))
