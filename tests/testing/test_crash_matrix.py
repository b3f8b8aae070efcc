"""crash_matrix: worker processes killed with SIGKILL at every step boundary of a
workflow on a real store (SQLite), each run finished by a fresh worker. It finds
the double charge of a non-idempotent step, passes its idempotent version, and
passes the quickstart example."""

from __future__ import annotations

from pathlib import Path

import pytest

from substantial import ConfigurationError, Context, workflow
from substantial.testing import crash_matrix

from .golden import EXAMPLES, example


def ledger_lines(ledger: Path, run_id: str) -> list[str]:
    return [ln for ln in ledger.read_text().splitlines() if ln.split()[0] == run_id]


@workflow()
async def pay(c: Context, ledger: str) -> str:
    """Charges by appending to a ledger, whatever happened before: not idempotent."""
    reserved = await c.save(lambda: "reserved", name="reserve")

    def charge() -> str:
        with open(ledger, "a") as f:
            f.write(f"{c.run_id} charged\n")
        return "charged"

    return f"{reserved}, {await c.save(charge, name='charge')}"


@workflow()
async def pay_once(c: Context, ledger: str) -> str:
    """The same charge, made idempotent by the step's idempotency key."""
    reserved = await c.save(lambda: "reserved", name="reserve")

    def charge() -> str:
        key = c.idempotency_key()
        with open(ledger, "a+") as f:
            f.seek(0)
            if key not in f.read().split():
                f.write(f"{c.run_id} {key}\n")
        return "charged"

    return f"{reserved}, {await c.save(charge, name='charge')}"


def sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'crash.db'}"


async def test_the_matrix_finds_the_double_charge_of_a_non_idempotent_step(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.txt"
    ledger.touch()
    m = await crash_matrix(pay, {"ledger": str(ledger)}, backend=sqlite(tmp_path))
    assert m.baseline == ("COMPLETED", "reserved, charged")
    assert m.steps == ["reserve", "charge"] and len(m.cases) == 6
    assert m.violations == []  # the guarantee held: every run ended as the baseline
    assert m.double_effects == [
        "killed after_effect of attempt 1: 'reserve' ran 1 extra time(s)",
        "killed after_effect of attempt 2: 'charge' ran 1 extra time(s)",
    ]
    [double] = [c for c in m.cases if c.point == "after_effect" and c.step == "charge"]
    assert double.runs == {"reserve": 1, "charge": 2}
    charged = [c.attempt for c in m.cases if len(ledger_lines(ledger, c.run_id)) == 2]
    assert charged == [2]  # the ledger shows it: charged twice
    with pytest.raises(AssertionError, match="'charge' ran twice"):
        m.assert_exactly_once(idempotent={"reserve"})


def test_the_matrix_passes_the_idempotent_version(tmp_path: Path) -> None:
    """(A plain call, from sync code: DESIGN writes it so.)"""
    ledger = tmp_path / "ledger.txt"
    ledger.touch()
    m = crash_matrix(pay_once, {"ledger": str(ledger)}, backend=sqlite(tmp_path))
    m.assert_exactly_once(idempotent={"reserve", "charge"})
    every = ledger.read_text().splitlines()
    runs = {line.split()[0] for line in every}
    assert len(every) == len(runs) == 7  # one charge per run: the baseline and 6 cases


async def test_the_quickstart_example_keeps_its_guarantee_at_every_boundary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # its effects file goes under ./.substantial/
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the worker processes import it too
    quickstart = example("quickstart")
    m = await crash_matrix(quickstart.order, {"item": "book", "steps": 2}, backend=sqlite(tmp_path))
    assert m.baseline == ("COMPLETED", "book: 2 steps")
    assert len(m.cases) == 6 and m.violations == []
    assert all(set(c.extra) <= {c.step} for c in m.cases)  # only the step in flight


async def test_the_matrix_needs_a_shared_store_and_an_importable_workflow() -> None:
    with pytest.raises(ConfigurationError, match="not memory://"):
        await crash_matrix(pay, {"ledger": "x"}, backend="memory://")

    @workflow(name="local")
    async def local(c: Context) -> None:
        return None

    with pytest.raises(ConfigurationError, match="not a module-level name"):
        await crash_matrix(local, backend="sqlite:///unused.db")
