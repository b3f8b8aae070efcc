"""What every durable call shares: its place in the replay, the write buffer,
the live edge, and the rule that calls of one run are made one at a time.

:class:`CallCore` is the base of :class:`~substantial.Context`; the mixins in
``_waits``, ``_steps`` and ``_composition`` build the primitives on it.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from . import _records as R
from ._interrupts import CancelRun, DeadlineExpired
from ._replay import Replay, Step
from ._types import RunStatus
from .codec import coerce
from .errors import WorkflowError

if TYPE_CHECKING:
    from ._session import RunSession

T = TypeVar("T")
P = ParamSpec("P")
CoreT = TypeVar("CoreT", bound="CallCore")
_PKG_DIR = os.path.dirname(__file__)


def caller() -> str:
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


class Done:
    """Awaitable no-op: ``c.log.info(...)`` works with or without ``await``, and
    ``_sync`` answers with one when there is nothing to pull."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield


_DONE = Done()


def one_at_a_time(
    fn: Callable[Concatenate[CoreT, P], Awaitable[T]],
) -> Callable[Concatenate[CoreT, P], Coroutine[Any, Any, T]]:
    """Durable calls of one run are sequential: their sequence ids are their order.

    ``asyncio.gather(c.save(a), c.save(b))`` would make that order depend on
    scheduling, so it is refused with a clear error instead of corrupting replay.
    """

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: CoreT, *args: P.args, **kwargs: P.kwargs) -> T:
        self._enter_call(name)
        try:
            return await fn(self, *args, **kwargs)
        finally:
            self._in_call = None

    return wrapper  # type: ignore[return-value]


class CallCore:
    """The replay index, the write buffer and the live edge of one run."""

    _reverting = False  # compensations of a cancel-revert run: a cancel no longer stops
    _events: Mapping[str, Any] = MappingProxyType({})  # declared event types (Context sets)

    def __init__(self, session: RunSession, *, hot_wait: float = 5.0) -> None:
        self._session = session
        self._hot_wait = hot_wait
        self._clock = session.journal.clock
        self.run_id: str = session.run_id
        self._handlers: list[tuple[str, Callable[[Any], Any]]] = []
        self._replay = Replay(self.run_id, session.records, self._feed_handlers)
        self._pending: list[R.Record] = []  # log records waiting for the next write
        self._in_call: str | None = None
        self._poisoned = False
        deadline = session.start.get("deadline")
        self._deadline: float | None = float(deadline) if deadline is not None else None

    def _enter_call(self, name: str) -> None:
        """The durable call ``name`` is in flight until its caller resets
        ``_in_call`` (in a ``finally``); a second one at once is refused (see
        ``one_at_a_time``). Not a context manager: this runs on every call."""
        if self._in_call is not None:
            self._poisoned = True  # the call already in flight must not write either
            raise WorkflowError(
                f"run {self.run_id}: {name}() was called while {self._in_call}() "
                "was still running; await durable calls one at a time (asyncio.gather "
                "over Context calls is not supported)"
            )
        self._in_call = name

    def _feed_handlers(self, event: R.Record) -> None:
        for name, cb in self._handlers:
            if name == event["name"]:
                cb(self._payload(event))

    def _payload(self, event: R.Record) -> Any:
        """An event's payload, as its declared type if the workflow declares one."""
        name = event["name"]
        tp = self._events.get(name)
        return event.get("v") if tp is None else coerce(event.get("v"), tp, what=f"event {name!r}")

    def _begin(
        self, p: str, name: str | None = None, *, key: str | None = None, step: str | None = None
    ) -> tuple[Step, str]:
        """The next durable call: the records that answer it, and where it is made."""
        at = caller()
        return self._replay.begin(p, name, key, at, step), at

    def _final(self, step: Step) -> R.Record | None:
        return self._replay.final(step)

    def _rec(
        self, k: str, seq: int, p: str, at: str, name: str | None = None, **fields: Any
    ) -> R.Record:
        """A durable call's record; every one but a log line (which has ``t``) carries
        ``t0``, when it was made (a save passes the start of its effect)."""
        rec: R.Record = {"k": k, "s": seq, "p": p, "at": at}
        if name is not None:
            rec["name"] = name
        rec.update(fields)
        if k != R.LOG and "t0" not in rec:
            rec["t0"] = self._clock()
        return rec

    def _sync(self) -> Awaitable[None]:
        """Live edge: take in pending events, check for cancellation (but while a
        cancel-revert runs its compensations: that cancel is what they answer).
        Not a coroutine: this runs once per step, and most of the time there is
        nothing to pull; the checks then run at once and no coroutine is made."""
        if self._session.needs_pull:
            return self._pull_then_check()
        self._check_edge()
        return _DONE

    async def _pull_then_check(self) -> None:
        await self._session.pull()
        self._check_edge()

    def _check_edge(self) -> None:
        session = self._session
        if session.run.cancel_requested and not self._reverting:
            raise CancelRun()
        self._check_deadline()
        self._replay.index_new()
        self._replay.advance(len(session.records))

    def _check_deadline(self) -> None:
        """At the live edge: a run past its deadline stops here (compensations of a
        revert already under way run on: they are what a cancel asked for)."""
        if self._deadline is not None and not self._reverting and self._clock() >= self._deadline:
            raise DeadlineExpired(self._deadline)

    def _check_writable(self) -> None:
        if self._poisoned:
            raise WorkflowError(f"run {self.run_id}: stopped after overlapping durable calls")

    async def _write(self, *recs: R.Record, what: str, waiting: bool = False) -> int:
        """Append records (after any buffered log lines); returns position of the last.
        ``waiting``: they start a wait, and the store shows the run SUSPENDED."""
        self._check_writable()
        batch = [*self._pending, *recs]
        self._pending.clear()
        first = await self._session.write(batch, what=what, waiting=waiting)
        self._replay.index_new()
        last = first + len(batch) - 1
        self._replay.advance(last + 1)
        return last

    def _unsettled(self) -> bool:
        """Whether user code's effect must wait for a write first: the store must
        show RUNNING and hold every call record made so far (a wait's end rides
        with the next write; an effect must not run ahead of it)."""
        if self._session.shown is not RunStatus.RUNNING:
            return True
        return bool(self._pending) and any(r["k"] == R.CALL for r in self._pending)

    def flush_records(self) -> list[R.Record]:
        """The buffered log lines, for the write that ends or suspends the run."""
        out = list(self._pending)
        self._pending.clear()
        return out

    @property
    def calls_made(self) -> int:
        """Sequence ids used so far (for a replay's report)."""
        return self._replay.next_seq

    def next_recorded(self) -> R.Record | None:
        """The first record of the next call the log holds that the code has not
        made yet (None: there is none)."""
        return self._replay.next_recorded()

    def check_complete(self) -> None:
        """The workflow returned: it must have made every call the log recorded."""
        self._replay.check_complete()
