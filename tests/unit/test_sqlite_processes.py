"""Several processes claiming from one SQLite file never share a run."""

from __future__ import annotations

from pathlib import Path

from . import racing


async def test_processes_claim_each_run_exactly_once(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    await racing.each_run_claimed_once(f"sqlite:///{tmp_path}/shared/state.db")


async def test_processes_appending_at_one_position_have_one_winner_each_time(
    tmp_path: Path,
) -> None:
    await racing.each_position_written_once(f"sqlite:///{tmp_path}/state.db")
