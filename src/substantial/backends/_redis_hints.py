"""The Redis store's hints: run ids its scripts PUBLISH on one channel, read by a
subscription that says when it is live and comes back after a dropped
connection (a module of its own: it shares nothing with the scripts but the
channel's name)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._supervision import reraise_if_cancelling

__all__ = ["hint_stream"]


async def hint_stream(
    client: Callable[[], aioredis.Redis | None], closed: Callable[[], bool], channel: str
) -> AsyncIterator[str]:
    """Run ids published on ``channel``. "" once SUBSCRIBE is confirmed (from then
    on every publish reaches us), and again after each reconnection. ``client``
    is the store's connection (None until it is open); ``closed`` ends the stream."""
    delay = 0.1
    while not closed():
        c = client()
        if c is None:  # not open yet
            await asyncio.sleep(delay)
            continue
        pubsub = c.pubsub()
        dropped = False
        try:
            await _subscribed(pubsub, channel, closed)
            delay = 0.1
            yield ""
            while not closed():
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                reraise_if_cancelling()
                if msg is not None and msg.get("type") == "message":
                    yield bytes(msg["data"]).decode(errors="replace")
        except (RedisConnectionError, RedisTimeoutError, OSError):
            reraise_if_cancelling()
            dropped = True
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        if dropped and not closed():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _subscribed(pubsub: Any, channel: str, closed: Callable[[], bool]) -> None:
    """SUBSCRIBE and wait for the server's confirmation: sending the command is not
    enough, a publish the server handles before reading it would be missed."""
    await pubsub.subscribe(channel)
    while True:
        reraise_if_cancelling()
        msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
        if msg is not None and msg.get("type") == "subscribe":
            return
        if closed():
            raise RedisConnectionError("the backend was closed while subscribing")
