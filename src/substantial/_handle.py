"""``RunHandle``: a client's reference to one run, and what it can ask of it.

Every method is one or a few store reads or writes through the Conductor's
journal; a handle holds no state but the run id (and the last run of its
continue_using chain seen so far, so ``send`` follows the chain in one step).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._history import History
from ._journal import Journal, RunEnd, summarize
from ._records import published
from ._types import LogRecord, RunStatus, RunSummary, Seconds, to_seconds
from .backends import RunRecord
from .errors import ClientError, RunCancelled, RunFailed, RunFinished, RunReverted

if TYPE_CHECKING:
    from .conductor import Conductor

__all__ = ["RunHandle"]

R = TypeVar("R")


class RunHandle(Generic[R]):
    """A reference to one run (it need not exist in this process).

    Typed by the workflow's return annotation: ``await handle.result()`` of a
    handle from ``start(wf)`` has the type ``wf`` returns."""

    def __init__(self, conductor: Conductor, run_id: str) -> None:
        self._conductor = conductor
        self.run_id = run_id
        self._tail = run_id  # where send() starts following the continue_using chain

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id!r})"

    # A run that calls continue_using ends CONTINUED and names its successor; the
    # handle follows the chain, so send, status, cancel and logs address the run
    # that carries on, as result() does.

    async def send(self, name: str, value: Any = None) -> None:
        """Deliver an event; once this returns the event is never lost."""
        journal = await self._journal()
        run_id = self._tail  # the last run of the chain seen so far: one round trip
        while True:
            try:
                payload = await self._conductor._event_payload(run_id, name, value)
                await journal.deliver(run_id, name, payload)
                self._tail = run_id
                return
            except RunFinished:  # it may have continued: follow and deliver there
                successor = continued_to(await journal.get(run_id))
                if successor is None:
                    raise
                run_id = successor

    async def status(self) -> RunStatus:
        return (await self._latest()).status

    async def state(self, key: str, default: Any = None) -> Any:
        """The latest value the run published under ``key`` (``c.publish``), across
        its continue_using chain; ``default`` if it published none. Read from the
        store: the run is not woken, and need not be served by a worker."""
        return (await self.states()).get(key, default)

    async def states(self) -> dict[str, Any]:
        """Every key the run (and the runs it continued into) published, latest
        values."""
        journal = await self._journal()
        out: dict[str, Any] = {}
        run_id: str | None = self.run_id
        while run_id is not None:
            run, records = await journal.read_log(run_id)
            out.update(published(records))
            run_id = continued_to(run)
        return out

    async def summary(self) -> RunSummary:
        return summarize(await self._latest())

    async def cancel(self, *, revert: bool = False) -> None:
        """Ask for cancellation; descendants are cancelled too. No-op on ended runs.

        ``revert=True``: the run first runs the compensations of its recorded saves,
        newest first, each once and durably (as ``c.revert()`` would), and ends
        REVERTED (``result()`` raises RunReverted); its descendants are cancelled."""
        journal = await self._journal()
        run_id: str | None = (await self._latest()).run_id
        while run_id is not None:
            await journal.cancel(run_id, revert=revert)
            run_id = continued_to(await journal.get(run_id))  # continued meanwhile

    async def resume(self) -> None:
        """Replay a FAILED or CANCELLED run with the code the workers run now: the
        way to recover from a bug in workflow code once the fix is deployed.

        The run returns to PENDING; its recorded steps stay recorded (they are not
        run again), and the call that failed runs again (the workflow's exception
        is forgotten; a save that exhausted its retries gets a fresh set). A run
        that is not FAILED or CANCELLED: ClientError; unknown: RunNotFound."""
        journal = await self._journal()
        await journal.resume((await self._latest()).run_id)

    async def logs(self) -> list[LogRecord]:
        """Log lines of this run and of the runs it continued into, in order."""
        journal = await self._journal()
        out, run_id = [], self.run_id
        while True:
            out += await journal.logs(run_id)
            successor = continued_to(await journal.get(run_id))
            if successor is None:
                return out
            run_id = successor

    async def history(self, *, limit: int | None = None, cursor: str | None = None) -> History:
        """This run's timeline (see :meth:`Conductor.history`)."""
        return await self._conductor.history(self.run_id, limit=limit, cursor=cursor)

    async def result(self, timeout: Seconds | None = None) -> R:
        """Wait for the run to end and return its value, following continue_using.

        Raises RunFailed (message = the run's error), RunCancelled, RunReverted,
        or TimeoutError after ``timeout``. A store outage shorter than ``timeout``
        is ridden out: the wait retries until the store answers again.
        """
        limit = None if timeout is None else to_seconds(timeout)
        async with asyncio.timeout(limit):
            run_id = self.run_id
            while True:
                run = await self._conductor._wait_terminal(run_id)
                successor = continued_to(run)
                if successor is None:
                    value: R = _outcome(run)
                    return value
                run_id = successor

    async def _journal(self) -> Journal:
        await self._conductor._ensure_open()
        return self._conductor.journal

    async def _latest(self) -> RunRecord:
        """The last run of this handle's continue_using chain (itself if none)."""
        journal = await self._journal()
        run = await journal.get(self.run_id)
        while (successor := continued_to(run)) is not None:
            run = await journal.get(successor)
        return run


def continued_to(run: RunRecord | RunEnd) -> str | None:
    if run.status == RunStatus.CONTINUED and isinstance(run.result, dict):
        successor = run.result.get("continued_to")
        return None if successor is None else str(successor)
    return None


def _outcome(run: RunEnd) -> Any:
    if run.status == RunStatus.COMPLETED:
        return run.result
    if run.status == RunStatus.FAILED:
        raise RunFailed(run.error or "the run failed", run_id=run.run_id, error_type=run.error_type)
    if run.status == RunStatus.CANCELLED:
        why = f": {run.error}" if run.error else ""
        raise RunCancelled(f"run {run.run_id!r} was cancelled{why}", run_id=run.run_id)
    if run.status == RunStatus.REVERTED:
        raise RunReverted(f"run {run.run_id!r} was reverted", run_id=run.run_id)
    raise ClientError(f"run {run.run_id!r} ended {run.status}")  # pragma: no cover
