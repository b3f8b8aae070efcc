"""Group commit: the appends of the runs one worker holds, committed together.

A run's append that finds no other in flight goes to the store at once, alone,
so a run by itself never waits for a batch to fill. Appends made while one is
in flight queue up, and go as one batch (one transaction, one round trip) as
soon as it lands; under load, batches form by themselves. Each caller resumes
when the batch holding its records is durable, never before (guarantee 1),
and each append is fenced on its own inside the batch: a stale run's refusal
fails only its own caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from .backends import Append, AppendsInBatches, Backend
from .errors import BackendUnavailable

log = logging.getLogger(__name__)

MAX_BATCH = 256  # appends per batch: bounds one transaction's size and a waiter's delay


class GroupCommit:
    """One worker process's queue of appends to a store that batches them."""

    def __init__(self, backend: Backend, *, max_batch: int = MAX_BATCH) -> None:
        self._backend = backend
        self._batches: AppendsInBatches | None = (
            backend if isinstance(backend, AppendsInBatches) else None
        )
        self._max = max_batch
        self._queue: list[tuple[Append, asyncio.Future[int]]] = []
        self._busy = False  # an append (alone) or a batch is in flight
        self._drain_task: asyncio.Task[None] | None = None
        self.batches = 0  # batches of more than one append sent so far (for tests)

    @property
    def queued(self) -> int:
        """Appends waiting for the one in flight to land (they go next, together)."""
        return len(self._queue)

    async def append(self, op: Append) -> int:
        """Commit ``op`` (with whatever else is waiting); the log's new length."""
        if self._busy:
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            entry = (op, fut)
            self._queue.append(entry)
            try:
                return await fut
            except asyncio.CancelledError:
                if entry in self._queue:  # not sent yet: it never will be
                    self._queue.remove(entry)
                raise
        self._busy = True
        try:
            return await self._alone(op)
        finally:
            self._hand_off()

    def _alone(self, op: Append) -> Awaitable[int]:
        return append_alone(self._backend, op)

    def _hand_off(self) -> None:
        """The append in flight landed: send what queued meanwhile, or go idle."""
        if self._queue:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        else:
            self._busy = False

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
                await self._commit(batch)
        finally:
            # Cancelled (the worker closing): what is still queued never went out.
            for _, fut in self._queue:
                _settle(fut, BackendUnavailable("the worker stopped before this append was sent"))
            self._queue = []
            self._busy = False
            self._drain_task = None

    async def _commit(self, batch: list[tuple[Append, asyncio.Future[int]]]) -> None:
        ops = [op for op, _ in batch]
        results: list[int | Exception]
        try:
            if len(ops) == 1:
                results = [await self._alone(ops[0])]
            else:
                assert self._batches is not None
                results = await self._batches.append_batch(ops)
                self.batches += 1
        except asyncio.CancelledError:
            for _, fut in batch:  # sent, but whether it committed is unknown
                _settle(fut, BackendUnavailable("the worker stopped while this append was sent"))
            raise
        except BackendUnavailable as exc:
            results = [exc] * len(ops)  # the store is down: for every append alike
        except Exception as exc:
            if len(ops) == 1:
                results = [exc]
            else:  # one bad append must not fail its neighbours: each on its own
                log.warning("a batch of %d appends failed (%s); retrying them one by one",
                            len(ops), type(exc).__name__)  # fmt: skip
                results = [await _outcome(self._alone(op)) for op in ops]
        for (_, fut), res in zip(batch, results, strict=True):
            _settle(fut, res)

    async def close(self) -> None:
        """Stop sending (what is queued fails with BackendUnavailable)."""
        task = self._drain_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def append_alone(backend: Backend, op: Append) -> Awaitable[int]:
    """``op`` as a plain :meth:`Backend.append` (a store that does not batch)."""
    return backend.append(
        op.run_id,
        token=op.token,
        expected_len=op.expected_len,
        records=op.records,
        update=op.update,
        now=op.now,
    )


async def _outcome(call: Awaitable[int]) -> int | Exception:
    try:
        return await call
    except Exception as exc:
        return exc


def _settle(fut: asyncio.Future[int], res: int | BaseException) -> None:
    if fut.done():  # its caller was cancelled meanwhile
        return
    if isinstance(res, BaseException):
        fut.set_exception(res)
    else:
        fut.set_result(res)


__all__ = ["MAX_BATCH", "GroupCommit", "append_alone"]
