"""``substantial dashboard`` serves the API from the command line."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from ..cli.conftest import cli_env, command, run_cli


def test_it_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    proc = run_cli("dashboard", "--host", "0.0.0.0", cwd=tmp_path, timeout=30)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "'0.0.0.0'" in line and "token" in line


def test_it_serves_the_api_with_the_token_from_the_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    proc = subprocess.Popen(
        command("--backend", url, "dashboard", "--port", "0"),
        cwd=tmp_path,
        env=cli_env({"SUBSTANTIAL_TOKEN": "from-env"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        base = None
        for line in proc.stderr:  # uvicorn names the port it got once it listens
            if m := re.search(r"running on (http://127\.0\.0\.1:\d+)", line):
                base = m.group(1)
                break
        assert base is not None, "the server never said it was listening"
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/api/runs").status_code == 401
            auth = {"Authorization": "Bearer from-env"}
            r = client.post("/api/runs", json={"workflow": "w", "run_id": "c1"}, headers=auth)
            assert r.status_code == 201
            runs = client.get("/api/runs", headers=auth).json()["runs"]
            assert [s["run_id"] for s in runs] == ["c1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        rest = "" if proc.stderr is None else proc.stderr.read()
        if proc.stderr is not None:
            proc.stderr.close()
    assert code == 0
    assert "substantial.http.access: POST /api/runs 201" in rest  # the access log, on stderr


def test_without_the_http_extra_it_says_which_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['starlette'] = None\n"  # as if starlette were not installed
        "from substantial.cli import run; sys.exit(run(['dashboard']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: substantial.http needs the optional dependency 'starlette': "
        "pip install 'substantial[http]'"
    )
