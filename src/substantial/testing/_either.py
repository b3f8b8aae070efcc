"""Test tools a test can call with or without ``await``.

DESIGN section 8 writes ``replay(history, workflow)`` and
``crash_matrix(wf, kwargs, backend=...)`` as plain calls, and async tests
naturally ``await`` them. Both work: the call runs the tool to its end and
returns its result (raising what it raises), and that result is also
awaitable, giving itself. Inside a running event loop the tool runs on a loop
of its own in a helper thread while the caller's loop waits: these tools own
everything they touch (a private memory store; worker processes), so nothing
of the caller's loop is needed meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Self, TypeVar

T = TypeVar("T")


class AwaitableResult:
    """A result that ``await`` gives back unchanged."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, Self]:
        return _itself(self).__await__()


async def _itself(value: T) -> T:
    return value


def run_to_end(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``make()`` to its end, from sync or async code."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as exc:  # handed to the caller, as if raised here
            box["error"] = exc

    thread = threading.Thread(target=target, name="substantial-testing")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value
