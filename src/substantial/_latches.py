"""Named events across runs: a latch per name, kept in the store as a run.

``emit_event(name, payload)`` sets the latch the first time; every run that
waits for it (``c.wait_for_event(name)``) gets that payload, those already
waiting and those that come later. No store needs a new operation: the latch
is a run (``substantial.event:<name>``, on a queue no worker serves) whose
*inbox* is the latch's history. Its inbox is totally ordered and every store
appends to it atomically, which gives the two rules everything else follows:

* the first ``emit`` item in the inbox is the event; later emits change nothing;
* a waiter appends a ``wait`` item, then reads the inbox; an emitter appends its
  ``emit`` item, then reads the inbox and wakes every waiter it finds there.
  Whatever the interleaving, one of the two sees the other: a waiter either
  finds the emit, or is found by the emitter (sometimes both, and the extra
  wake-up event is never read).

Every emit wakes the runs that registered before the latch was set (the ones
after it look and find it). Both sides may repeat (a step that ran again after a
crash): a second ``wait`` item only wakes the same run twice, a second emit only
repeats wake-ups; a repeated wake-up is an event the run takes in and never
reads. An emitter that dies in the middle of its fan-out leaves the waiters it
had not reached waiting until the next ``emit_event`` of that name, which fans
out again (the latch stays as it was).
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson

from ._journal import Journal
from .errors import ClientError, RunFinished, RunNotFound

__all__ = ["LATCH_QUEUE", "emit", "is_latch", "latch_id", "wait_in", "wake_event"]

LATCH_QUEUE = "substantial.events"  # no worker serves it: latch runs are never claimed
_WORKFLOW = "substantial.event"
_UNSET: Any = object()


def is_latch(workflow: str) -> bool:
    """Whether runs of ``workflow`` are latches: the engine's bookkeeping, left out
    of listings and counts that do not ask for that workflow by name."""
    return workflow == _WORKFLOW


def latch_id(name: str) -> str:
    return f"substantial.event:{name}"


def wake_event(name: str) -> str:
    """The event a waiting run receives when latch ``name`` is set."""
    return f"substantial.event:{name}"


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ClientError(f"an event name is a non-empty string, got {name!r}")
    return name


async def _latch(journal: Journal, name: str) -> tuple[int | None, Any, list[str]]:
    """The inbox id of the emit that set the latch and its payload (None and
    ``_UNSET``: not set yet), and the runs that began waiting before it (a run
    that registered after it finds it when it looks: no one need wake it)."""
    rid = latch_id(name)
    await journal.create(run_id=rid, workflow=_WORKFLOW, kwargs={"event": name}, queue=LATCH_QUEUE)
    first: int | None = None
    payload: Any = _UNSET
    waiters: list[str] = []
    for item in await journal.inbox(rid):
        doc = orjson.loads(item.data)
        if doc.get("name") == "emit" and first is None:
            first, payload = item.id, doc.get("v")
        elif doc.get("name") == "wait" and first is None:
            waiters.append(str(doc.get("v")))
    return first, payload, waiters


async def emit(journal: Journal, name: str, payload: Any) -> bool:
    """Set latch ``name`` (if nobody did before) and wake its waiters; True if this
    emit set it."""
    await _latch(journal, check_name(name))  # the latch run exists before its inbox
    mine = await journal.deliver(latch_id(name), "emit", payload)
    first, value, waiters = await _latch(journal, name)
    for run_id in dict.fromkeys(waiters):
        with contextlib.suppress(RunNotFound, RunFinished):  # gone, or over: not waiting
            await journal.deliver(run_id, wake_event(name), value)
    return first == mine


async def wait_in(journal: Journal, name: str, run_id: str) -> dict[str, Any]:
    """Register ``run_id`` as a waiter of latch ``name``; ``{"set": True, "v": payload}``
    if it is set already (else the run receives ``wake_event(name)`` when it is)."""
    await _latch(journal, check_name(name))
    await journal.deliver(latch_id(name), "wait", run_id)
    first, payload, _ = await _latch(journal, name)
    return {"set": False} if first is None else {"set": True, "v": payload}
