"""The examples shown in the README run as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_seed_readme_example_on_files_prints_final_output_100(tmp_path: Path) -> None:
    out = run_example([str(ROOT / "examples" / "readme.py")], cwd=tmp_path)
    assert "Final output 100" in out
    assert (tmp_path / "demo" / "logs" / "readme").is_dir()


def test_seed_readme_workflow_on_the_default_store(tmp_path: Path) -> None:
    script = tmp_path / "main.py"
    script.write_text(
        (ROOT / "examples" / "readme.py")
        .read_text()
        .replace('backend = FSBackend("./demo/logs/readme")', "backend = None")
        .replace(
            "sys.path.insert(0, str(Path(__file__).resolve().parent))",
            f"sys.path.insert(0, {str(ROOT / 'examples')!r})",
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "SUBSTANTIAL_BACKEND"}
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "Final output 100" in out.stdout
    assert (tmp_path / ".substantial" / "state.db").exists()


@pytest.mark.crash
def test_quickstart_survives_a_killed_worker(tmp_path: Path) -> None:
    out = run_example([str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path)
    assert "every step ran exactly once." in out
