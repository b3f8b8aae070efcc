"""Steps: ``save`` (its attempts, retries and their backoff), recorded values
(``now``, ``random``, ``uuid4``) and log lines.

A save's effect runs once per attempt at the live edge; its outcome (the JSON
value, or the final error) is recorded before the workflow continues, so a
replay returns it without calling ``f`` again. A failed attempt that will be
retried records a ``try`` with the time of the next one and waits it out like
a timer (in place if short).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from inspect import CO_COROUTINE
from types import FunctionType
from typing import TYPE_CHECKING, Any

from . import _records as R
from . import telemetry
from ._calls import Done
from ._threads import run_in_thread
from ._types import DEFAULT_RETRY, Retry, Seconds, to_seconds
from ._waits import Waits
from .codec import coerce, to_json
from .errors import PayloadTooLarge, SaveFailed, SerializationError

if TYPE_CHECKING:
    from ._session import RunSession

run_log = logging.getLogger("substantial.run")


@dataclass(slots=True)
class _Attempts:
    """What one save's attempts need to know. (Not frozen: a frozen dataclass
    costs a few microseconds to make, and one is made per executed save.)"""

    seq: int
    p: str
    at: str
    name: str  # the step's display name (not checked on replay; see step_name)
    what: str
    keyed: dict[str, str]
    policy: Retry
    limit: float | None


class Steps(Waits):
    def __init__(self, session: RunSession, *, hot_wait: float = 5.0) -> None:
        super().__init__(session, hot_wait=hot_wait)
        self._compensations: list[tuple[int, Callable[[], Any]]] = []
        self._executing: int | None = None  # the save whose effect is running
        self._meter = telemetry.step_meter(session.run.workflow)

    async def _save(
        self,
        p: str,
        f: Callable[[], Any],
        compensate_with: Callable[[], Any] | None,
        retry: Retry | None,
        timeout: Seconds | None,
        tp: Any,
        key: str | None = None,
        name: str | None = None,
    ) -> Any:
        step, at = self._begin(p, key=key, step=name)
        what = f"{p}() at {at} (step {step.seq})"
        final = self._final(step)
        if final is None:
            run = _Attempts(
                seq=step.seq,
                p=p,
                at=at,
                name=name or step_name(f),
                what=what,
                keyed={} if key is None else {"key": key},
                policy=retry or DEFAULT_RETRY,
                limit=None if timeout is None else to_seconds(timeout),
            )
            final = await self._execute(run, f, step.records)
        err = final.get("err")
        if err is None and compensate_with is not None:
            self._compensations.append((step.seq, compensate_with))
        if err is not None:
            if err["type"] in ("SerializationError", "PayloadTooLarge"):
                cls = PayloadTooLarge if err["type"] == "PayloadTooLarge" else SerializationError
                raise cls(err["msg"])
            raise SaveFailed(err["msg"], error_type=err["type"], attempts=err["n"], step=step.seq)
        return coerce(final.get("v"), tp, what=what)

    async def _execute(
        self, run: _Attempts, f: Callable[[], Any], recs: list[R.Record]
    ) -> R.Record:
        """Attempts until one succeeds or the policy gives up; returns the final
        record (written). Resumes after the attempts a replay found recorded."""
        await self._sync()
        tries = [r for r in recs if r["k"] == R.TRY]
        attempt = len(tries)
        if tries:
            await self._wait(tries[-1]["retry"], events=False, budget_end=self._budget())
        while True:
            attempt += 1
            final = await self._attempt(run, f, attempt)
            if final is not None:
                await self._write(final, what=run.what)
                return final

    async def _attempt(self, run: _Attempts, f: Callable[[], Any], n: int) -> R.Record | None:
        """One call of ``f``: its final record, or None after recording a failure
        that will be retried and waiting out its backoff. Each record says when
        the effect started (``t0``) and how long it took (``ms``)."""
        session = self._session
        if self._unsettled():  # user code runs: say so first
            await self._write(what=run.what)
        wf = session.run.workflow
        t0 = self._clock()
        p0 = time.perf_counter()  # (the metric's clock: t0 may be a virtual one)
        fields: dict[str, Any] = {"step": run.name, "t0": t0, **run.keyed}
        final: R.Record | None = None
        try:
            try:
                effect = session.journal.effect(self.run_id, run.name, f)
                self._executing = run.seq  # c.idempotency_key() inside f names this step
                out = await telemetry.step(
                    _invoke(effect, run.limit), self.run_id, wf, run.name, run.at, n
                )
            finally:
                self._executing = None
                fields["ms"] = _ms_since(t0, self._clock())
            value = to_json(out, what=run.what, limit=session.journal.max_payload)
            final = {"k": R.CALL, "s": run.seq, "p": run.p, "at": run.at, "v": value, **fields}
        except SerializationError as exc:  # (PayloadTooLarge too) retrying cannot help
            err = {"type": type(exc).__name__, "msg": str(exc), "n": n}
            final = self._rec(R.CALL, run.seq, run.p, run.at, err=err, **fields)
        except Exception as exc:
            err = {"type": type(exc).__name__, "msg": str(exc) or type(exc).__name__}
            if n >= run.policy.max_attempts or isinstance(exc, run.policy.non_retryable):
                final_err = {**err, "n": n}
                final = self._rec(R.CALL, run.seq, run.p, run.at, err=final_err, **fields)
        except BaseException:  # interrupted (the worker stops): timed, not counted
            telemetry.step_done(self._meter, None, time.perf_counter() - p0, interrupted=True)
            raise
        telemetry.step_done(self._meter, final, time.perf_counter() - p0)
        if final is not None:
            return final
        retry_at = self._clock() + run.policy.delay_after(n)
        attempt = self._rec(R.TRY, run.seq, run.p, run.at, n=n, err=err, retry=retry_at, **fields)
        await self._write(attempt, what=run.what, waiting=True)
        await self._wait(retry_at, events=False, budget_end=self._budget())
        return None

    async def _value(self, p: str, make: Callable[[], Any]) -> Any:
        step, at = self._begin(p)
        final = self._final(step)
        if final is None:
            await self._sync()
            final = self._rec(R.CALL, step.seq, p, at, v=make())
            await self._write(final, what=f"{p}()")
        return final["v"]

    def _log(self, level: str, message: str, fields: dict[str, Any]) -> Done:
        step, at = self._begin("log")
        if step.records:
            return Done()
        rec = self._rec(
            R.LOG,
            step.seq,
            "log",
            at,
            level=level,
            msg=str(message),
            fields=to_json(fields, what=f"log.{level}() fields"),
            t=self._clock(),
        )
        self._pending.append(rec)  # written with the next record
        py_level = {"info": logging.INFO, "warn": logging.WARNING}.get(level, logging.ERROR)
        extra = {"run_id": self.run_id, "fields": fields}
        run_log.log(py_level, "[%s] %s", self.run_id, message, extra=extra)
        return Done()


def step_name(f: Callable[[], Any]) -> str:
    """How the timeline names a save of ``f``: its qualified name; a lambda by its
    code location (``file.py:12``), as its qualified name says little.
    Display only: stored as ``step``, never compared on replay, so renaming a
    function (or moving a lambda) keeps old logs replaying."""
    if type(f) is FunctionType:  # the usual case, first: one check per executed save
        plain: str = f.__qualname__
        if not plain.endswith("<lambda>"):
            return plain
    target: Any = f
    while isinstance(target, functools.partial):
        target = target.func
    qualname = getattr(target, "__qualname__", None)
    if not isinstance(qualname, str):
        return type(target).__qualname__
    code = getattr(target, "__code__", None)
    if qualname.endswith("<lambda>") and code is not None:
        return f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    return qualname


_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})


def _ms_since(t0: float, t1: float) -> float:
    """Milliseconds from ``t0`` to ``t1`` to the microsecond (never negative: a
    clock stepped back). Not ``round()``: it is slow, and this runs per attempt."""
    ms = (t1 - t0) * 1000.0
    return int(ms * 1000.0 + 0.5) / 1000.0 if ms > 0.0 else 0.0


async def _invoke(f: Callable[[], Any], timeout: float | None) -> Any:
    """Call ``f``: coroutine functions on the loop, plain callables in a thread
    (so a long blocking step cannot starve lease heartbeats; see ``_threads``)."""
    if (type(f) is FunctionType and f.__code__.co_flags & CO_COROUTINE) or (
        inspect.iscoroutinefunction(f)
    ):
        aw: Awaitable[Any] = f()
    else:
        aw = run_in_thread(f)
    if timeout is None:
        result = await aw
        if type(result) in _PLAIN:  # (isawaitable is slow on a plain value)
            return result
        return (await result) if inspect.isawaitable(result) else result
    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
    async with asyncio.timeout(timeout):
        result = await aw
        if inspect.isawaitable(result):
            result = await result
    return result
