"""Several processes sharing one FSBackend directory never share a run or a run id."""

from __future__ import annotations

from pathlib import Path

from . import racing


async def test_processes_claim_each_run_exactly_once(tmp_path: Path) -> None:
    await racing.each_run_claimed_once(f"file://{tmp_path}/shared")


async def test_processes_creating_one_id_create_it_once(tmp_path: Path) -> None:
    await racing.each_id_created_once(f"file://{tmp_path}/shared")
    assert list((tmp_path / "shared" / "tmp").iterdir()) == []  # losers cleaned up


async def test_processes_appending_at_one_position_have_one_winner_each_time(
    tmp_path: Path,
) -> None:
    await racing.each_position_written_once(f"file://{tmp_path}/shared")
