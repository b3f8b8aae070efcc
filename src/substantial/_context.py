"""The workflow-side API: :class:`Context` and its durable primitives.

Determinism rules (read these before writing a workflow):

* Every durable call (``save``, ``sleep``, ``receive``, ``ensure``, ``now``,
  ``random``, ``uuid4``, ``log.*``, ``start_child``, ``revert``,
  ``continue_using``) gets the next sequence id in call order. On replay a call
  whose record exists returns the recorded outcome without acting.
* So workflow code between durable calls must decide the same way on every
  replay: no wall clock (use ``c.now()``), no ``random`` (``c.random()``), no
  I/O, no reading mutable global state. Anything that may differ goes in
  ``c.save(...)``.
* Events are positional: an event becomes visible at the point of the log where
  the worker moved it from the run's inbox, so every replay sees the same
  events at the same point.
* If replay meets a different call than the log recorded at a step, the run
  stops FAILED with a :class:`~substantial.errors.NonDeterminismError` naming
  both calls and where they were made; it is never silently continued.
* ``compact()`` keeps only the last record of each ``key``: a loop it compacts
  must carry its state through keyed calls and key the calls it makes (log
  lines aside). On replay, calls before the compaction are answered by key
  (the value the key had then) and unkeyed ones in order; from the compaction
  point, or the loop's exit if the kept state ends it sooner, calls match by
  sequence id again, so calls after the loop need no key (``_replay``).
* Changing code under runs in flight: put new calls behind ``c.patched(id)``
  (a run that passed that point before keeps the old code), and check a
  deploy with ``substantial replay-check`` (docs/how-to/change-code-safely.md).
"""

from __future__ import annotations

import builtins
import hashlib
import random as _random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _records as R
from ._calls import Done, caller, one_at_a_time
from ._composition import ChildHandle, Composition, child_event, child_outcome
from ._latches import check_name, emit, wait_in, wake_event
from ._replay import patch_key
from ._types import Retry, Seconds, to_seconds
from .codec import to_json
from .workflow import Workflow, workflow_name

if TYPE_CHECKING:
    from ._session import RunSession

__all__ = ["ChildHandle", "Context", "RunLogger", "child_event", "child_outcome"]

T = TypeVar("T")
M = TypeVar("M")


class RunLogger:
    """``c.log.info(message, **fields)``: recorded once, not once per replay.

    A log line takes a sequence id like any durable call, and is written with
    the run's next record; awaiting it is optional."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def info(self, message: str, **fields: Any) -> Done:
        return self._ctx._log("info", message, fields)

    def warn(self, message: str, **fields: Any) -> Done:
        return self._ctx._log("warn", message, fields)

    warning = warn

    def error(self, message: str, **fields: Any) -> Done:
        return self._ctx._log("error", message, fields)


class Context(Composition):
    """What a workflow receives as its first argument. See the module docstring."""

    def __init__(
        self,
        session: RunSession,
        *,
        hot_wait: float = 5.0,
        events: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(session, hot_wait=hot_wait)
        if events:
            self._events = dict(events)
        start = session.start
        self.workflow: str = start.get("wf", session.run.workflow)
        self.kwargs: dict[str, Any] = dict(start.get("kw") or {})
        self.log = RunLogger(self)

    # -- steps ------------------------------------------------------------------

    @overload
    async def save(
        self,
        f: Callable[[], Awaitable[T]],
        *,
        compensate_with: Callable[[], Any] | None = None,
        retry: Retry | None = None,
        timeout: Seconds | None = None,
        key: str | None = None,
        name: str | None = None,
        type: None = None,
    ) -> T: ...

    @overload
    async def save(
        self,
        f: Callable[[], T],
        *,
        compensate_with: Callable[[], Any] | None = None,
        retry: Retry | None = None,
        timeout: Seconds | None = None,
        key: str | None = None,
        name: str | None = None,
        type: None = None,
    ) -> T: ...

    @overload
    async def save(
        self,
        f: Callable[[], Any],
        *,
        compensate_with: Callable[[], Any] | None = None,
        retry: Retry | None = None,
        timeout: Seconds | None = None,
        key: str | None = None,
        name: str | None = None,
        type: builtins.type[M],
    ) -> M: ...

    async def save(
        self,
        f: Callable[[], Any],
        *,
        compensate_with: Callable[[], Any] | None = None,
        retry: Retry | None = None,
        timeout: Seconds | None = None,
        key: str | None = None,
        name: str | None = None,
        type: Any = None,
    ) -> Any:
        """Run ``f`` (sync or async, no arguments) once and persist its JSON result;
        every replay returns the stored value without calling ``f``.

        The value comes back as its JSON form (a tuple as a list, a datetime as
        a string) unless ``type=`` coerces it back (a pydantic model, dataclass,
        ``datetime``, ``UUID``...): the live run and a replay see the same.
        A failed attempt is retried per ``retry`` (a durable backoff); the last
        failure raises :class:`~substantial.SaveFailed`. ``compensate_with`` is
        what :meth:`revert` runs if the save succeeded. ``timeout`` bounds one
        attempt. ``key`` names the value for :meth:`compact`. ``name`` is how the
        run's history shows the step (default: ``f``'s qualified name, a lambda
        by its code location); it is display only, not checked on replay."""
        self._enter_call("save")  # (one_at_a_time, inlined: save has overloads)
        try:
            return await self._save("save", f, compensate_with, retry, timeout, type, key, name)
        finally:
            self._in_call = None

    @one_at_a_time
    async def now(self) -> datetime:
        """Current time (aware UTC), recorded: identical on replay."""
        t = await self._value("now", self._clock)
        return datetime.fromtimestamp(t, UTC)

    @one_at_a_time
    async def random(self) -> float:
        """A float in [0, 1), recorded."""
        return float(await self._value("random", _random.random))

    @one_at_a_time
    async def uuid4(self) -> uuid.UUID:
        """A random UUID, recorded."""
        return uuid.UUID(await self._value("uuid4", lambda: str(uuid.uuid4())))

    def idempotency_key(self) -> str:
        """A key to hand an external API so a step that runs again charges once.

        Called inside a save's function, it names that save; elsewhere in the
        workflow, the next durable call. The same on every replay and every
        re-execution of the step (a retry, or a run again after its worker died
        with the step in flight), different for every other step and run. At most
        64 characters: ``<run_id>:<step>``, or a digest of it for long run ids."""
        seq = self._executing if self._executing is not None else self._replay.next_seq
        key = f"{self.run_id}:{seq}"
        if len(key) <= 64:
            return key
        return "sub-" + hashlib.sha256(key.encode()).hexdigest()[:60]

    # -- named events across runs ----------------------------------------------------

    async def wait_for_event(self, name: str, *, timeout: Seconds | None = None) -> Any:
        """The payload of named event ``name`` (``emit_event``), shared by every run:
        a latch. Set already, it returns at once; else the run waits for it (a
        ``timeout`` raises ``TimeoutError``). Two durable calls: a step that
        registers the run as a waiter and looks, and, if needed, a receive."""
        check_name(name)
        journal, run_id = self._session.journal, self.run_id

        async def register() -> dict[str, Any]:
            return await wait_in(journal, name, run_id)

        got = await self.save(register, name=f"wait_for_event:{name}")
        if got.get("set"):
            return got.get("v")
        return await self.receive(wake_event(name), timeout=timeout)

    async def emit_event(self, name: str, payload: Any = None) -> bool:
        """Set named event ``name`` to ``payload`` for every run waiting for it, now
        or later; True if this call set it (the first emit wins). A step."""
        check_name(name)
        journal = self._session.journal

        async def emit_once() -> bool:
            return await emit(journal, name, payload)

        return bool(await self.save(emit_once, name=f"emit_event:{name}"))

    # -- published state -------------------------------------------------------------

    async def publish(self, key: str, value: Any) -> None:
        """Make ``value`` the run's latest ``key``, for readers outside it:
        ``handle.state(key)`` reads it without waking the run, searches filter on
        it (``{"state": {key: term}}``), ``show`` and the dashboard list it.

        Not a step: it is written with the run's next record, only when the run
        is past what its log holds (a replay does not write it again), and a
        compaction keeps the latest value of each key."""
        if not isinstance(key, str) or not key:
            raise ValueError("publish() needs a key: a non-empty string")
        self._check_writable()
        if not self._replay.live():
            return
        v = to_json(value, what=f"publish({key!r}) value", limit=self._session.journal.max_payload)
        self._pending.append({"k": R.STATE, "name": key, "v": v, "t": self._clock()})

    # -- versioning -----------------------------------------------------------------

    def patched(self, patch_id: str) -> bool:
        """Whether this run takes the code path of patch ``patch_id``::

            if c.patched("fraud-check"):
                await c.save(check_fraud)   # the new code
            await c.save(charge)

        True for a run that reaches this point with the patch deployed (a marker
        is recorded) and for a run whose log has the marker; False for a run
        that passed this point before the patch was deployed: it replays the old
        code as it ran. Once no such run is left, see :meth:`deprecate_patch`.
        Not awaited: the marker goes to the store with the run's next write."""
        return self._patch("patched", patch_id, deprecated=False)

    def deprecate_patch(self, patch_id: str) -> None:
        """Stand-in for ``patched(patch_id)`` once no run that passed this point
        before the patch is left (keep only the new code): runs that recorded the
        marker still replay, new runs record none. Remove the call once no run
        with the marker is left either."""
        self._patch("deprecate_patch", patch_id, deprecated=True)

    def _patch(self, call: str, patch_id: str, *, deprecated: bool) -> bool:
        if not isinstance(patch_id, str) or not patch_id:
            raise ValueError(f"{call}() needs a patch id: a non-empty string")
        self._enter_call(call)
        try:
            self._check_writable()
            taken, seq = self._replay.patch(patch_id, deprecated=deprecated)
            if seq is not None:
                at = caller()
                marker = self._rec(
                    R.CALL, seq, "patch", at, name=patch_id, key=patch_key(patch_id), v=True
                )
                self._pending.append(marker)  # written with the next record
            return taken
        finally:
            self._in_call = None

    # -- waits ------------------------------------------------------------------

    @one_at_a_time
    async def sleep(self, duration: Seconds, *, key: str | None = None) -> None:
        """Durable timer: survives restarts; the run reads SUSPENDED meanwhile.

        The due time is fixed when the timer is set, so a replay never pushes
        it back. ``key``: see :meth:`compact`."""
        step, at = self._begin("sleep", key=key)
        await self._timer(step, at, lambda: self._clock() + to_seconds(duration), key)

    @one_at_a_time
    async def sleep_until(self, when: datetime, *, key: str | None = None) -> None:
        """Durable timer until ``when`` (an aware datetime)."""
        step, at = self._begin("sleep", key=key)
        if when.tzinfo is None:
            raise ValueError("sleep_until() needs an aware datetime (e.g. tzinfo=UTC)")
        await self._timer(step, at, when.timestamp, key)

    @one_at_a_time
    async def receive(self, name: str, *, timeout: Seconds | None = None) -> Any:
        """The next unconsumed event ``name``, in send order; waits for one.

        An event is visible from its position in the log on, so a replay gets
        the same one. An expired ``timeout`` raises ``TimeoutError``; an event
        arriving later stays for the next ``receive`` of that name."""
        return await self._receive(name, timeout)

    def handle(self, name: str, cb: Callable[[Any], Any]) -> None:
        """Apply ``cb(payload)`` to every event ``name``, in order, now and as they
        arrive. Callbacks run again on every replay: keep them quick,
        deterministic and free of side effects (those go in ``save``)."""
        self._handlers.append((name, cb))
        for event in self._replay.visible(name):
            cb(self._payload(event))

    @one_at_a_time
    async def ensure(
        self,
        pred: Callable[[], bool],
        *,
        poll: Seconds | None = None,
        timeout: Seconds | None = None,
    ) -> bool:
        """Suspend until ``pred()`` is true, re-checked on each new event (and every
        ``poll``). Once true it is recorded: a replay does not call ``pred``."""
        return await self._ensure(pred, poll, timeout)

    # -- composition --------------------------------------------------------------

    @one_at_a_time
    async def start_child(
        self,
        wf: Workflow[Any] | str,
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
    ) -> ChildHandle:
        """Start a child run (``<run_id>.<seq>``, on this run's queue unless
        ``queue``); cancelling this run cancels it too. A ``Workflow`` with a
        ``timeout`` gives the child its deadline."""
        timeout = wf.timeout if isinstance(wf, Workflow) else None
        return await self._start_child(workflow_name(wf), kwargs, queue, timeout)

    @one_at_a_time
    async def revert(self) -> None:
        """Run the compensations of the saves that succeeded, newest first (each a
        durable step), then end the run REVERTED."""
        await self._revert()

    @one_at_a_time
    async def continue_using(
        self, wf: Workflow[Any] | str, kwargs: dict[str, Any] | None = None
    ) -> None:
        """End this run and carry on in a fresh run (new log); handles follow it,
        and events this run never saw are handed to it."""
        await self._continue_using(workflow_name(wf), kwargs)

    @one_at_a_time
    async def compact(self) -> None:
        """Keep only the last record of each ``key`` (see ``save(key=...)``), so the
        log of a long-lived looping workflow stays bounded.

        Records without a key stay, and a mark records where the run compacted.
        On replay, calls before the mark match by key (a keyed call returns the
        value its key had at the compaction) and unkeyed ones in order; from the
        compaction point (this ``compact()`` call, or the loop's exit if the
        kept state ends the loop sooner) calls match by sequence id again. So
        state carried from one round to the next must go through keyed calls;
        see docs/concepts/replay.md. Takes no sequence id."""
        await self._compact()
