"""Composition: child runs, ``continue_using``, ``revert``, and ``compact``.

A child is a run of its own, ``<parent id>.<seq>``, created before the
parent records it (so a replay creates the same id again, a no-op); when it
ends, the journal delivers its outcome to the parent as an internal event,
which ``ChildHandle.result()`` receives like any event. The parent sends it
again if it finds the child ended and no outcome in its log (the child's worker
may have died before its notice); its log can lag its inbox, so both may send
it, and the session takes each child's outcome in once. ``continue_using``
ends the run CONTINUED and creates its successor; ``revert`` runs the
compensations of the saves that succeeded, newest first, each as a durable
step; ``compact`` rewrites the log through the pure function of
``_compaction`` and tells the replay index where it now stands.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from . import _records as R
from ._calls import one_at_a_time
from ._compaction import compact as compact_log
from ._interrupts import StopRun
from ._steps import Steps, step_name
from ._types import RunStatus
from .codec import to_json
from .errors import RunCancelled, RunFailed, RunReverted

if TYPE_CHECKING:
    from ._session import RunSession
    from .backends import RunRecord

REVERT = "revert"  # the marker record of a cancel-revert (see Composition.cancel_revert)


def child_event(run_id: str) -> str:
    """The internal event that carries the outcome of child ``run_id``."""
    return f"{R.CHILD_OUTCOME}{run_id}"


def child_outcome(run: Any) -> dict[str, Any]:
    return {"status": run.status.value, "v": run.result, "err": run.error}


class ChildHandle:
    """A child run started by ``c.start_child``; ``await h.result()`` is durable."""

    def __init__(self, ctx: Composition, run_id: str) -> None:
        self._ctx = ctx
        self.run_id = run_id

    async def result(self) -> Any:
        """The child's return value, or its failure raised here (RunFailed,
        RunCancelled, RunReverted). Waits (durably) until the child ends."""
        outcome = await self._ctx.child_result(self.run_id)
        status = outcome.get("status")
        if status == RunStatus.COMPLETED:
            return outcome.get("v")
        msg = outcome.get("err") or f"child run {self.run_id} ended {status}"
        if status == RunStatus.CANCELLED:
            raise RunCancelled(msg, run_id=self.run_id)
        if status == RunStatus.REVERTED:
            raise RunReverted(msg, run_id=self.run_id)
        raise RunFailed(msg, run_id=self.run_id)


class Composition(Steps):
    def __init__(self, session: RunSession, *, hot_wait: float = 5.0) -> None:
        super().__init__(session, hot_wait=hot_wait)
        # A cancel-revert that began before (this is a replay of it): its marker's
        # sequence id. The replay stops at the call before it (see cancel_revert).
        self._revert_seq: int | None = None
        if session.run.revert_requested:
            marks = [r["s"] for r in session.records if r.get("p") == REVERT and r.get("cancel")]
            if marks:
                self._revert_seq = marks[0]
                self._replay.stop_at = marks[0] - 1

    async def _start_child(
        self,
        name: str,
        kwargs: dict[str, Any] | None,
        queue: str | None,
        timeout: float | None = None,
    ) -> ChildHandle:
        step, at = self._begin("start_child", name)
        final = self._final(step)
        if final is None:
            await self._sync()
            child_id = f"{self.run_id}.{step.seq}"
            # A child cannot outlive its parent's deadline: it ends with the same
            # reason when that passes (or at its own, if sooner).
            deadline = self._session.start.get("deadline")
            if timeout is not None:
                own = self._clock() + timeout
                deadline = own if deadline is None else min(deadline, own)
            await self._session.journal.create(
                run_id=child_id,
                workflow=name,
                kwargs=dict(kwargs or {}),
                queue=queue or self._session.run.queue,
                parent_id=self.run_id,
                deadline=deadline,
            )
            final = self._rec(R.CALL, step.seq, "start_child", at, name, v=child_id)
            await self._write(final, what="start_child()")
        return ChildHandle(self, final["v"])

    @one_at_a_time
    async def child_result(self, child_id: str) -> dict[str, Any]:
        """Receive the outcome of child ``child_id`` (see ChildHandle.result)."""
        name = child_event(child_id)
        if self._replay.live() and self._replay.next_event(name) is None:
            await self._redeliver_if_ended(child_id, name)
        value = await self._receive(name, None)
        return value if isinstance(value, dict) else {}

    async def _redeliver_if_ended(self, child_id: str, name: str) -> None:
        """If the child already ended but its notice was lost, send it again (it may
        only be late: a second copy is dropped as the parent takes it in)."""
        journal = self._session.journal
        child: RunRecord | None = await journal.get_or_none(child_id)
        while (  # a child that continued ends in the last run of its chain
            child is not None
            and child.status == RunStatus.CONTINUED
            and isinstance(child.result, dict)
        ):
            child = await journal.get_or_none(str(child.result["continued_to"]))
        if child is not None and child.status.is_terminal and not self._replay.by_name.get(name):
            await journal.deliver(self.run_id, name, child_outcome(child))
            self._session.notify()

    async def _revert(self) -> None:
        for _, comp in reversed(self._compensations):
            await self._save("compensate", comp, None, None, None, None, name=step_name(comp))
        self._compensations.clear()
        raise StopRun(RunStatus.REVERTED)

    async def cancel_revert(self) -> None:
        """A cancel that asked for a revert (``handle.cancel(revert=True)``): run the
        compensations of the saves replayed so far, newest first, each a durable step.

        The cancel stopped the workflow at the call it interrupted (sequence id
        n - 1); a marker at n records that the revert began there, and the
        compensations follow at n + 1, ... A replay after a crash stops at that same
        call (``Replay.stop_at``), having replayed the same saves, so it rebuilds the
        same compensations and finds the ones already run in the log: each runs
        exactly once."""
        self._reverting = True
        self._replay.stop_at = None
        if self._revert_seq is not None:
            self._replay.next_seq = self._revert_seq
        step = self._replay.begin(REVERT, None, None, "cancel")
        if not step.records:
            mark = self._rec(R.CALL, step.seq, REVERT, "cancel", cancel=True)
            await self._write(mark, what="cancel(revert=True)")
        for _, comp in reversed(self._compensations):
            await self._save("compensate", comp, None, None, None, None)
        self._compensations.clear()

    async def _compact(self) -> None:
        if not self._replay.compact_here():  # replaying: the log already goes further
            return
        self._check_writable()
        records = [*self._session.records, *self._pending]  # log lines go in too
        out = compact_log(records, next_seq=self._replay.next_seq, compacts=self._replay.compacts)
        if out is None:
            return
        await self._session.rewrite(out.records)
        self._pending.clear()
        cursor = out.position_of(self._replay.cursor)
        self._replay.reload(self._session.records, cursor=cursor, live=True)

    async def _continue_using(self, name: str, kwargs: dict[str, Any] | None) -> None:
        step, at = self._begin("continue_using", name)
        final = self._final(step)
        if final is None:
            await self._sync()
            final = self._rec(
                R.CALL,
                step.seq,
                "continue_using",
                at,
                name,
                v=str(uuid.uuid4()),
                kw=to_json(dict(kwargs or {}), what="continue_using() kwargs"),
            )
            await self._write(final, what="continue_using()")
        await self._session.journal.create(
            run_id=final["v"],
            workflow=name,
            kwargs=final["kw"],
            queue=self._session.run.queue,
            parent_id=self._session.run.parent_id,
            origin=self._session.start.get("origin", self.run_id),
            deadline=self._session.start.get("deadline"),  # the same run, carried on
            priority=self._session.run.priority,  # and its place in a limited queue
            concurrency_key=self._session.run.concurrency_key,
        )
        raise StopRun(RunStatus.CONTINUED, {"continued_to": final["v"]}, self._unobserved())

    def _unobserved(self) -> list[bytes]:
        """Events in the log the workflow never saw: not received, no handler for
        their name (internal ones aside). A continuing run hands them on."""
        handled = {name for name, _ in self._handlers}
        events = self._replay.unconsumed(
            lambda name: name in handled or name.startswith("substantial.")
        )
        encode = self._session.journal.encode
        return [encode({"name": e["name"], "v": e.get("v")}, "forwarded event") for e in events]
