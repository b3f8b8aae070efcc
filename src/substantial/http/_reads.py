"""What the API shows that the Conductor has no public call for yet.

* A run's start kwargs and the children it started, read from its log through
  ``conductor.journal`` (the start record holds ``kw``; each ``start_child``
  call's record holds the child's id). One read of the log serves both.
* Run counts by workflow and status, counted over ``search_page`` pages: one
  pass over the runs, a page in memory at a time.

Both belong in the Conductor (see docs/reference/http.md, "Limits").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _records as R
from .._records import decode_record
from .._types import RunStatus
from ..conductor import Conductor
from ..errors import RunNotFound

COUNT_PAGE = 500  # runs per page while counting


@dataclass(frozen=True, kw_only=True, slots=True)
class Lineage:
    kwargs: dict[str, Any]
    children: list[str]


async def lineage(conductor: Conductor, run_id: str) -> Lineage:
    """The run's start kwargs and its children's ids, in the order it started them.

    A child started under a ``key`` in a loop the run compacted keeps only its last
    call's record, so such a run lists only its latest child of that key."""
    await conductor.__aenter__()  # opens the store once (idempotent)
    snap = await conductor.journal.backend.read(run_id)
    if snap is None:
        raise RunNotFound(run_id)
    kwargs: dict[str, Any] = {}
    children: list[str] = []
    for i, data in enumerate(snap.log):
        rec = decode_record(run_id, i, data)
        if rec["k"] == R.START:
            kw = rec.get("kw")
            kwargs = kw if isinstance(kw, dict) else {}
        elif rec["k"] == R.CALL and rec.get("p") == "start_child" and isinstance(rec.get("v"), str):
            children.append(rec["v"])
    return Lineage(kwargs=kwargs, children=children)


async def counts(conductor: Conductor) -> dict[str, dict[str, int]]:
    """Runs per workflow and status, every registered workflow included (zeros)."""
    found: dict[str, dict[str, int]] = {name: _zeros() for name in conductor.workflows}
    cursor: str | None = None
    while True:
        page = await conductor.search_page(None, limit=COUNT_PAGE, cursor=cursor)
        for s in page.runs:
            found.setdefault(s.workflow, _zeros())[str(s.status)] += 1
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


def _zeros() -> dict[str, int]:
    return {str(st): 0 for st in RunStatus}
