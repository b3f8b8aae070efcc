"""What the API shows that the Conductor has no public call for yet.

* Run counts by workflow and status, counted over ``search_page`` pages: one
  pass over the runs, a page in memory at a time.

It belongs in the Conductor (see docs/reference/http.md, "Limits").
"""

from __future__ import annotations

from .._types import RunStatus
from ..conductor import Conductor

COUNT_PAGE = 500  # runs per page while counting


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
