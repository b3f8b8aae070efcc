"""Waiting: durable timers, and the one arm -> check -> wait loop that serves
``receive``, ``ensure`` and their timeouts (a child's result is a receive).

A wait continues in place while it is short (``hot_wait``) and otherwise
unwinds the coroutine with :class:`Suspend`, so the worker can evict the run.
Its first record (``arm``) says where it started and until when it may last,
and carries the SUSPENDED status to the store; the record that ends it carries
RUNNING (see ``RunSession.write``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _records as R
from ._calls import CallCore
from ._interrupts import CancelRun, Suspend
from ._replay import Step, describe
from ._types import RunStatus, Seconds, to_seconds


class Waits(CallCore):
    def _budget(self) -> float:
        """When an in-place wait that starts now must give up and suspend."""
        return self._clock() + self._hot_wait

    async def _wait(self, due: float | None, *, events: bool, budget_end: float) -> None:
        """Wait for ``due`` (and/or a new event) in place if short, else suspend.

        Returns when ``due`` has passed or, with ``events``, when something may
        have arrived; raises Suspend to unwind once the wait outlasts
        ``budget_end`` (fixed by the caller when the primitive started waiting).
        """
        if self._session.run.cancel_requested and not self._reverting:
            raise CancelRun()  # a replay reached a wait after a cancel (see cancel_revert)
        while True:
            self._check_deadline()
            now = self._clock()
            if due is not None and now >= due:
                return
            if now >= budget_end or (due is not None and due > budget_end and not events):
                raise Suspend(due)
            limit = budget_end - now if due is None else min(budget_end, due) - now
            if self._deadline is not None:
                limit = min(limit, max(self._deadline - now, 0.0))
            await self._session.show(RunStatus.SUSPENDED)  # (its record usually did)
            if await self._session.wait_for_change(limit):
                if events:
                    await self._sync()
                    return
                # a timer: take events in (their position is fixed now) and watch
                # for cancellation, but apply them only at the next durable call
                await self._session.pull_if_needed()
                if self._session.run.cancel_requested and not self._reverting:
                    raise CancelRun()

    async def _timer(
        self, step: Step, at: str, due_fn: Callable[[], float], key: str | None
    ) -> None:
        """A sleep. Its place in the log is its ARM record: events are applied up
        to it, never during the wait, so code after the sleep sees the same on
        replay."""
        if step.records:
            self._replay.advance(self._replay.first_position(step) + 1)
            if step.done:
                return
            due = step.records[0]["due"]
        else:
            await self._sync()
            due = due_fn()
            keyed = {} if key is None else {"key": key}
            arm = self._rec(R.ARM, step.seq, "sleep", at, due=due, **keyed)
            await self._write(arm, what="sleep()", waiting=True)
        await self._wait(due, events=False, budget_end=self._budget())

    async def _receive(self, name: str, timeout: Seconds | None) -> Any:
        step, at = self._begin("receive", name)
        final = self._final(step)
        if final is None:
            final = await self._until(step, at, "receive", name, self._event_check(name), timeout)
        if final.get("to"):
            raise TimeoutError(f"receive({name!r}) timed out")
        self._replay.consume(name)
        return self._payload(self._session.records[final["ev"]])

    def _event_check(self, name: str) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            pos = self._replay.next_event(name)
            return None if pos is None else {"ev": pos}

        return check

    async def _ensure(
        self, pred: Callable[[], bool], poll: Seconds | None, timeout: Seconds | None
    ) -> bool:
        step, at = self._begin("ensure")
        final = self._final(step)
        if final is None:

            def check() -> dict[str, Any] | None:
                return {} if pred() else None

            final = await self._until(step, at, "ensure", None, check, timeout, poll)
        if final.get("to"):
            raise TimeoutError("ensure() timed out")
        return True

    async def _until(
        self,
        step: Step,
        at: str,
        p: str,
        name: str | None,
        check: Callable[[], dict[str, Any] | None],
        timeout: Seconds | None,
        poll: Seconds | None = None,
    ) -> R.Record:
        """Arm, check, wait, until ``check()`` gives the outcome (the final record's
        fields) or the deadline passes (``to``). The arm is written only if the
        first check fails: it is the wait's own record."""
        arm = next((r for r in step.records if r["k"] == R.ARM), None)
        due = arm["due"] if arm else None
        budget_end = self._budget()
        what = describe(p, name, None)
        while True:
            await self._sync()
            outcome = check()
            if outcome is not None:
                break
            if arm is None:
                due = None if timeout is None else self._clock() + to_seconds(timeout)
                arm = self._rec(R.ARM, step.seq, p, at, name, due=due)
                await self._write(arm, what=what, waiting=True)
            if due is not None and self._clock() >= due:
                outcome = {"to": True}
                break
            wake = due
            if poll is not None:
                nxt = self._clock() + to_seconds(poll)
                wake = nxt if wake is None else min(wake, nxt)
            await self._wait(wake, events=True, budget_end=budget_end)
        final = self._rec(R.CALL, step.seq, p, at, name, **outcome)
        if "ev" in outcome:
            # An event taken: its position is fixed already and any write puts the
            # staged event in first, so a replay that finds no final record takes
            # the same event. The record goes with the run's next write (the end,
            # the next call's record, the status before a save's effect) and saves
            # a round trip; a timeout or an ensure is written at once (a replay
            # could decide otherwise).
            self._pending.append(final)
        else:
            await self._write(final, what=what)
        return final
