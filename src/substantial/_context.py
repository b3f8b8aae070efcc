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
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import random as _random
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Generator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from . import _records as R
from . import telemetry
from ._compaction import compact as compact_log
from ._interrupts import CancelRun, StopRun, Suspend
from ._replay import Replay, Step
from ._threads import run_in_thread
from ._types import DEFAULT_RETRY, Retry, RunStatus, Seconds, to_seconds
from .codec import coerce, to_json
from .errors import (
    PayloadTooLarge,
    RunCancelled,
    RunFailed,
    RunReverted,
    SaveFailed,
    SerializationError,
    WorkflowError,
)
from .workflow import Workflow, workflow_name

if TYPE_CHECKING:
    from ._journal import RunSession

T = TypeVar("T")
P = ParamSpec("P")
CtxT = TypeVar("CtxT", bound="Context")
run_log = logging.getLogger("substantial.run")
_PKG_DIR = os.path.dirname(__file__)


def _caller() -> str:
    """``file.py:line`` of the user code that made the current durable call."""
    f: Any = sys._getframe(2)
    while f is not None:
        short = _short_name(f.f_code.co_filename)
        if short is not None:
            return f"{short}:{f.f_lineno}"
        f = f.f_back
    return "?"


@functools.lru_cache(maxsize=1024)
def _short_name(filename: str) -> str | None:
    """The base name of a user file, None for ours. Cached: every durable call
    walks a few frames."""
    return None if os.path.dirname(filename) == _PKG_DIR else os.path.basename(filename)


def _one_at_a_time(
    fn: Callable[Concatenate[CtxT, P], Awaitable[T]],
) -> Callable[Concatenate[CtxT, P], Coroutine[Any, Any, T]]:
    """Durable calls of one run are sequential: their sequence ids are their order.

    ``asyncio.gather(c.save(a), c.save(b))`` would make that order depend on
    scheduling, so it is refused with a clear error instead of corrupting replay.
    """

    @functools.wraps(fn)
    async def wrapper(self: CtxT, *args: P.args, **kwargs: P.kwargs) -> T:
        if self._in_call is not None:
            self._poisoned = True  # the call already in flight must not write either
            raise WorkflowError(
                f"run {self.run_id}: {fn.__name__}() was called while {self._in_call}() "
                "was still running; await durable calls one at a time (asyncio.gather "
                "over Context calls is not supported)"
            )
        self._in_call = fn.__name__
        try:
            return await fn(self, *args, **kwargs)
        finally:
            self._in_call = None

    return wrapper  # type: ignore[return-value]


class _Done:
    """Awaitable no-op: ``c.log.info(...)`` works with or without ``await``."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield


class RunLogger:
    """``c.log.info(message, **fields)``: recorded once, not once per replay."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def info(self, message: str, **fields: Any) -> _Done:
        return self._ctx._log("info", message, fields)

    def warn(self, message: str, **fields: Any) -> _Done:
        return self._ctx._log("warn", message, fields)

    warning = warn

    def error(self, message: str, **fields: Any) -> _Done:
        return self._ctx._log("error", message, fields)


class ChildHandle:
    """A child run started by ``c.start_child``; ``await h.result()`` is durable."""

    def __init__(self, ctx: Context, run_id: str) -> None:
        self._ctx = ctx
        self.run_id = run_id

    async def result(self) -> Any:
        outcome = await self._ctx._child_outcome(self.run_id)
        status = outcome.get("status")
        if status == RunStatus.COMPLETED:
            return outcome.get("v")
        msg = outcome.get("err") or f"child run {self.run_id} ended {status}"
        if status == RunStatus.CANCELLED:
            raise RunCancelled(msg, run_id=self.run_id)
        if status == RunStatus.REVERTED:
            raise RunReverted(msg, run_id=self.run_id)
        raise RunFailed(msg, run_id=self.run_id)


def child_event(run_id: str) -> str:
    return f"substantial.child:{run_id}"


class Context:
    """What a workflow receives as its first argument. See the module docstring."""

    def __init__(self, session: RunSession, *, hot_wait: float = 5.0) -> None:
        self._session = session
        self._hot_wait = hot_wait
        self._clock = session.journal.clock
        start = session.start
        self.run_id: str = session.run_id
        self.workflow: str = start.get("wf", session.run.workflow)
        self.kwargs: dict[str, Any] = dict(start.get("kw") or {})
        self.log = RunLogger(self)
        self._handlers: list[tuple[str, Callable[[Any], Any]]] = []
        self._replay = Replay(self.run_id, session.records, self._feed_handlers)
        self._pending: list[R.Record] = []  # log records waiting for the next write
        self._compensations: list[tuple[int, Callable[[], Any]]] = []
        self._in_call: str | None = None
        self._poisoned = False

    # -- bookkeeping ----------------------------------------------------------

    def _feed_handlers(self, event: R.Record) -> None:
        for name, cb in self._handlers:
            if name == event["name"]:
                cb(event.get("v"))

    def _begin(
        self, p: str, name: str | None = None, *, key: str | None = None
    ) -> tuple[Step, str]:
        at = _caller()
        return self._replay.begin(p, name, key, at), at

    def _final(self, step: Step) -> R.Record | None:
        return self._replay.final(step)

    async def _sync(self) -> None:
        """Live edge: take in pending events, check for cancellation."""
        await self._session.pull_if_needed()
        if self._session.run.cancel_requested:
            raise CancelRun()
        self._replay.index_new()
        self._replay.advance(len(self._session.records))

    async def _write(self, *recs: R.Record, what: str, waiting: bool = False) -> int:
        """Append records (after any buffered log lines); returns position of the last.
        ``waiting``: they start a wait, and the store shows the run SUSPENDED."""
        if self._poisoned:
            raise WorkflowError(f"run {self.run_id}: stopped after overlapping durable calls")
        batch = [*self._pending, *recs]
        self._pending.clear()
        first = await self._session.write(batch, what=what, waiting=waiting)
        self._replay.index_new()
        last = first + len(batch) - 1
        self._replay.advance(last + 1)
        return last

    def _rec(
        self, k: str, seq: int, p: str, at: str, name: str | None = None, **fields: Any
    ) -> R.Record:
        rec: R.Record = {"k": k, "s": seq, "p": p, "at": at}
        if name is not None:
            rec["name"] = name
        rec.update(fields)
        return rec

    def flush_records(self) -> list[R.Record]:
        out = list(self._pending)
        self._pending.clear()
        return out

    def check_complete(self) -> None:
        """The workflow returned: it must have made every call the log recorded."""
        self._replay.check_complete()

    # -- waiting --------------------------------------------------------------

    def _budget(self) -> float:
        """When an in-place wait that starts now must give up and suspend."""
        return self._clock() + self._hot_wait

    async def _wait(self, due: float | None, *, events: bool, budget_end: float) -> None:
        """Wait for ``due`` (and/or a new event) in place if short, else suspend.

        Returns when ``due`` has passed or, with ``events``, when something may
        have arrived; raises Suspend to unwind once the wait outlasts
        ``budget_end`` (fixed by the caller when the primitive started waiting).
        """
        while True:
            now = self._clock()
            if due is not None and now >= due:
                return
            if now >= budget_end or (due is not None and due > budget_end and not events):
                raise Suspend(due)
            limit = budget_end - now if due is None else min(budget_end, due) - now
            await self._session.show(RunStatus.SUSPENDED)  # (its record usually did)
            if await self._session.wait_for_change(limit):
                if events:
                    await self._sync()
                    return
                # a timer: take events in (their position is fixed now) and watch
                # for cancellation, but apply them only at the next durable call
                await self._session.pull_if_needed()
                if self._session.run.cancel_requested:
                    raise CancelRun()

    # -- primitives -------------------------------------------------------------

    @_one_at_a_time
    async def save(
        self,
        f: Callable[[], T | Awaitable[T]],
        *,
        compensate_with: Callable[[], Any] | None = None,
        retry: Retry | None = None,
        timeout: Seconds | None = None,
        key: str | None = None,
        type: Any = None,
    ) -> Any:
        """Run ``f`` once and persist its JSON result; replays return the stored value.

        ``key`` names the value for :meth:`compact`, which keeps only the last
        record of each key."""
        return await self._save("save", f, compensate_with, retry, timeout, type, key)

    async def _save(
        self,
        p: str,
        f: Callable[[], Any],
        compensate_with: Callable[[], Any] | None,
        retry: Retry | None,
        timeout: Seconds | None,
        tp: Any,
        key: str | None = None,
    ) -> Any:
        step, at = self._begin(p, key=key)
        seq, recs = step.seq, step.records
        what = f"{p}() at {at} (step {seq})"
        final = self._final(step)
        if final is None:
            policy = retry or DEFAULT_RETRY
            final = await self._execute(seq, p, at, f, recs, policy, timeout, what, key)
        err = final.get("err")
        if err is None and compensate_with is not None:
            self._compensations.append((seq, compensate_with))
        if err is not None:
            if err["type"] in ("SerializationError", "PayloadTooLarge"):
                cls = PayloadTooLarge if err["type"] == "PayloadTooLarge" else SerializationError
                raise cls(err["msg"])
            raise SaveFailed(err["msg"], error_type=err["type"], attempts=err["n"], step=seq)
        return coerce(final.get("v"), tp, what=what)

    async def _execute(
        self,
        seq: int,
        p: str,
        at: str,
        f: Callable[[], Any],
        recs: list[R.Record],
        policy: Retry,
        timeout: Seconds | None,
        what: str,
        key: str | None = None,
    ) -> R.Record:
        keyed = {} if key is None else {"key": key}
        await self._sync()
        tries = [r for r in recs if r["k"] == R.TRY]
        attempt = len(tries)
        if tries:
            await self._wait(tries[-1]["retry"], events=False, budget_end=self._budget())
        limit = None if timeout is None else to_seconds(timeout)
        while True:
            attempt += 1
            await self._session.show(RunStatus.RUNNING)  # user code runs: say so first
            try:
                wf = self._session.run.workflow
                value = await telemetry.step(_invoke(f, limit), self.run_id, wf, f, at, attempt)
                final = self._rec(
                    R.CALL,
                    seq,
                    p,
                    at,
                    v=to_json(value, what=what, limit=self._session.journal.max_payload),
                    **keyed,
                )
            except SerializationError as exc:
                final = self._rec(
                    R.CALL,
                    seq,
                    p,
                    at,
                    err={"type": type(exc).__name__, "msg": str(exc), "n": attempt},
                    **keyed,
                )
            except Exception as exc:
                msg = str(exc) or type(exc).__name__
                err = {"type": type(exc).__name__, "msg": msg}
                if attempt >= policy.max_attempts or isinstance(exc, policy.non_retryable):
                    final = self._rec(R.CALL, seq, p, at, err={**err, "n": attempt}, **keyed)
                else:
                    retry_at = self._clock() + policy.delay_after(attempt)
                    telemetry.step_retried(self._session.run.workflow)
                    await self._write(
                        self._rec(R.TRY, seq, p, at, n=attempt, err=err, retry=retry_at, **keyed),
                        what=what,
                        waiting=True,
                    )
                    await self._wait(retry_at, events=False, budget_end=self._budget())
                    continue
            telemetry.step_ended(self._session.run.workflow, final)
            await self._write(final, what=what)
            return final

    @_one_at_a_time
    async def sleep(self, duration: Seconds, *, key: str | None = None) -> None:
        """Durable timer: survives restarts. ``key``: see :meth:`compact`."""
        step, at = self._begin("sleep", key=key)
        await self._timer(step, at, lambda: self._clock() + to_seconds(duration), key)

    @_one_at_a_time
    async def sleep_until(self, when: datetime, *, key: str | None = None) -> None:
        step, at = self._begin("sleep", key=key)
        if when.tzinfo is None:
            raise ValueError("sleep_until() needs an aware datetime (e.g. tzinfo=UTC)")
        await self._timer(step, at, when.timestamp, key)

    async def _timer(
        self, step: Step, at: str, due_fn: Callable[[], float], key: str | None
    ) -> None:
        # A sleep's place in the log is its ARM record: events are applied up to it,
        # never during the wait, so code after the sleep sees the same on replay.
        seq, recs = step.seq, step.records
        if recs:
            self._replay.advance(self._replay.first_position(step) + 1)
            if step.done:
                return
            due = recs[0]["due"]
        else:
            await self._sync()
            due = due_fn()
            keyed = {} if key is None else {"key": key}
            arm = self._rec(R.ARM, seq, "sleep", at, due=due, **keyed)
            await self._write(arm, what="sleep()", waiting=True)
        await self._wait(due, events=False, budget_end=self._budget())

    @_one_at_a_time
    async def receive(self, name: str, *, timeout: Seconds | None = None) -> Any:
        """The next unconsumed event ``name``, in send order; waits for one."""
        step, at = self._begin("receive", name)
        final = self._final(step)
        if final is None:
            final = await self._await_event(step.seq, step.records, at, name, timeout)
        if not final.get("to"):
            self._replay.consume(name)
        if final.get("to"):
            raise TimeoutError(f"receive({name!r}) timed out")
        return self._session.records[final["ev"]].get("v")

    def _next_event(self, name: str) -> int | None:
        return self._replay.next_event(name)

    async def _await_event(
        self, seq: int, recs: list[R.Record], at: str, name: str, timeout: Seconds | None
    ) -> R.Record:
        arm = next((r for r in recs if r["k"] == R.ARM), None)
        due = arm["due"] if arm else None
        budget_end = self._budget()
        while True:
            await self._sync()
            pos = self._next_event(name)
            if pos is not None:
                final = self._rec(R.CALL, seq, "receive", at, name, ev=pos)
                break
            if arm is None:  # the wait's own record: where it started, and its deadline
                due = None if timeout is None else self._clock() + to_seconds(timeout)
                arm = self._rec(R.ARM, seq, "receive", at, name, due=due)
                await self._write(arm, what=f"receive({name!r})", waiting=True)
            if due is not None and self._clock() >= due:
                final = self._rec(R.CALL, seq, "receive", at, name, to=True)
                break
            await self._wait(due, events=True, budget_end=budget_end)
        await self._write(final, what=f"receive({name!r})")
        return final

    def handle(self, name: str, cb: Callable[[Any], Any]) -> None:
        """Apply ``cb(payload)`` to every event ``name``, in order, now and as they arrive."""
        self._handlers.append((name, cb))
        for event in self._replay.visible(name):
            cb(event.get("v"))

    @_one_at_a_time
    async def ensure(
        self,
        pred: Callable[[], bool],
        *,
        poll: Seconds | None = None,
        timeout: Seconds | None = None,
    ) -> bool:
        """Suspend until ``pred()`` is true (re-checked on each new event, and every ``poll``)."""
        step, at = self._begin("ensure")
        seq, recs = step.seq, step.records
        final = self._final(step)
        if final is None:
            arm = next((r for r in recs if r["k"] == R.ARM), None)
            due = arm["due"] if arm else None
            budget_end = self._budget()
            while True:
                await self._sync()
                if pred():
                    final = self._rec(R.CALL, seq, "ensure", at)
                    break
                if arm is None:
                    due = None if timeout is None else self._clock() + to_seconds(timeout)
                    arm = self._rec(R.ARM, seq, "ensure", at, due=due)
                    await self._write(arm, what="ensure()", waiting=True)
                if due is not None and self._clock() >= due:
                    final = self._rec(R.CALL, seq, "ensure", at, to=True)
                    break
                wake = due
                if poll is not None:
                    nxt = self._clock() + to_seconds(poll)
                    wake = nxt if wake is None else min(wake, nxt)
                await self._wait(wake, events=True, budget_end=budget_end)
            await self._write(final, what="ensure()")
        if final.get("to"):
            raise TimeoutError("ensure() timed out")
        return True

    async def _value(self, p: str, make: Callable[[], Any]) -> Any:
        step, at = self._begin(p)
        seq = step.seq
        final = self._final(step)
        if final is None:
            await self._sync()
            final = self._rec(R.CALL, seq, p, at, v=make())
            await self._write(final, what=f"{p}()")
        return final["v"]

    @_one_at_a_time
    async def now(self) -> datetime:
        """Current time (aware UTC), recorded: identical on replay."""
        t = await self._value("now", self._clock)
        return datetime.fromtimestamp(t, UTC)

    @_one_at_a_time
    async def random(self) -> float:
        """A float in [0, 1), recorded."""
        return float(await self._value("random", _random.random))

    @_one_at_a_time
    async def uuid4(self) -> uuid.UUID:
        """A random UUID, recorded."""
        return uuid.UUID(await self._value("uuid4", lambda: str(uuid.uuid4())))

    def _log(self, level: str, message: str, fields: dict[str, Any]) -> _Done:
        step, at = self._begin("log")
        seq = step.seq
        if step.records:
            return _Done()
        rec = self._rec(
            R.LOG,
            seq,
            "log",
            at,
            level=level,
            msg=str(message),
            fields=to_json(fields, what=f"log.{level}() fields"),
            t=self._clock(),
        )
        self._pending.append(rec)
        py_level = {"info": logging.INFO, "warn": logging.WARNING}.get(level, logging.ERROR)
        run_log.log(
            py_level,
            "[%s] %s",
            self.run_id,
            message,
            extra={"run_id": self.run_id, "fields": fields},
        )
        return _Done()

    # -- composition --------------------------------------------------------------

    @_one_at_a_time
    async def start_child(
        self,
        wf: Workflow[Any] | str,
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
    ) -> ChildHandle:
        """Start a child run; cancelling this run cancels it too."""
        name = workflow_name(wf)
        step, at = self._begin("start_child", name)
        seq = step.seq
        final = self._final(step)
        if final is None:
            await self._sync()
            child_id = f"{self.run_id}.{seq}"
            await self._session.journal.create(
                run_id=child_id,
                workflow=name,
                kwargs=dict(kwargs or {}),
                queue=queue or self._session.run.queue,
                parent_id=self.run_id,
            )
            final = self._rec(R.CALL, seq, "start_child", at, name, v=child_id)
            await self._write(final, what="start_child()")
        return ChildHandle(self, final["v"])

    async def _child_outcome(self, child_id: str) -> dict[str, Any]:
        name = child_event(child_id)
        if self._replay.live() and self._next_event(name) is None:
            # Live: if the child already ended but its notice was lost, re-send it.
            journal = self._session.journal
            child = await journal.get_or_none(child_id)
            while (  # a child that continued ends in the last run of its chain
                child is not None
                and child.status == RunStatus.CONTINUED
                and isinstance(child.result, dict)
            ):
                child = await journal.get_or_none(str(child.result["continued_to"]))
            if (
                child is not None
                and child.status.is_terminal
                and not self._replay.by_name.get(name)
            ):
                await journal.deliver(self.run_id, name, child_outcome(child))
                self._session.notify()
        value = await self.receive(name)
        return value if isinstance(value, dict) else {}

    @_one_at_a_time
    async def revert(self) -> None:
        """Run recorded compensations in reverse order (durably), then end as REVERTED."""
        for _, comp in reversed(self._compensations):
            await self._save("compensate", comp, None, None, None, None)
        self._compensations.clear()
        raise StopRun(RunStatus.REVERTED)

    @_one_at_a_time
    async def compact(self) -> None:
        """Keep only the last record of each ``key`` (see ``save(key=...)``), so the
        log of a long-lived looping workflow stays bounded.

        Records without a key stay, and a mark records where the run compacted.
        On replay, calls before the mark match by key (a keyed call returns the
        value its key had at the compaction) and unkeyed ones in order; from the
        compaction point on (this ``compact()`` call, or the loop's exit if the
        kept state ends the loop sooner) calls match by sequence id again. So
        state carried from one round to the next must go through keyed calls;
        see docs/concepts/replay.md. Takes no sequence id."""
        if not self._replay.compact_here():  # replaying: the log already goes further
            return
        if self._poisoned:
            raise WorkflowError(f"run {self.run_id}: stopped after overlapping durable calls")
        records = [*self._session.records, *self._pending]  # log lines go in too
        out = compact_log(records, next_seq=self._replay.next_seq, compacts=self._replay.compacts)
        if out is None:
            return
        await self._session.rewrite(out.records)
        self._pending.clear()
        cursor = out.position_of(self._replay.cursor)
        self._replay.reload(self._session.records, cursor=cursor, live=True)

    @_one_at_a_time
    async def continue_using(
        self, wf: Workflow[Any] | str, kwargs: dict[str, Any] | None = None
    ) -> None:
        """End this run and carry on in a fresh run (new log); handles follow it."""
        name = workflow_name(wf)
        step, at = self._begin("continue_using", name)
        seq = step.seq
        final = self._final(step)
        if final is None:
            await self._sync()
            final = self._rec(
                R.CALL,
                seq,
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
        )
        raise StopRun(RunStatus.CONTINUED, {"continued_to": final["v"]}, self._unobserved_events())

    def _unobserved_events(self) -> list[bytes]:
        """Events in the log the workflow never saw: not received, no handler for
        their name (internal ones aside). A continuing run hands them on."""
        handled = {name for name, _ in self._handlers}
        events = self._replay.unconsumed(
            lambda name: name in handled or name.startswith("substantial.")
        )
        return [
            self._session.journal.encode({"name": e["name"], "v": e.get("v")}, "forwarded event")
            for e in events
        ]


def child_outcome(run: Any) -> dict[str, Any]:
    return {"status": run.status.value, "v": run.result, "err": run.error}


async def _invoke(f: Callable[[], Any], timeout: float | None) -> Any:
    """Call ``f``: coroutine functions on the loop, plain callables in a thread
    (so a long blocking step cannot starve lease heartbeats; see ``_threads``)."""
    if inspect.iscoroutinefunction(f):
        aw: Awaitable[Any] = f()
    else:
        aw = run_in_thread(f)
    if timeout is None:
        result = await aw
        return (await result) if inspect.isawaitable(result) else result
    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
    async with asyncio.timeout(timeout):
        result = await aw
        if inspect.isawaitable(result):
            result = await result
    return result
