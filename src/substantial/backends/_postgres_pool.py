"""The connections of the PostgreSQL store: its pools, its retries, its LISTEN.

Statements use a pool, but a connection is kept out of it between statements
(asyncpg's release costs a third of a step); lease renewals use a connection of
their own (the *control* pool) so they never queue behind steps. Hints come
through a dedicated LISTEN connection, re-established with backoff when lost.

Connection failures become BackendUnavailable, never showing the password. Which
operations may be retried once their statement was sent is the store's call
(``retry=`` of :meth:`PostgresConnections._call`; see ``postgres.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from ..errors import BackendError, BackendUnavailable, ConfigurationError
from . import _rules as rules

T = TypeVar("T")

_RETRY_DELAYS = (0.05, 0.2, 0.5)


def is_connection_error(exc: BaseException) -> bool:
    if isinstance(
        exc,
        OSError  # includes TimeoutError and ConnectionError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.CrashShutdownError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.exceptions.TooManyConnectionsError,
    ):
        return True
    # A connection the server killed while it sat idle can refuse its next statement
    # with "another operation is in progress" before anything is sent: it is dead.
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return "in progress" in str(exc)
    # InterfaceError is also misuse; only "connection is closed" / "pool is closing" count
    return isinstance(exc, asyncpg.InterfaceError) and "clos" in str(exc)


class PostgresConnections:
    """The pools and the LISTEN connection of one store (the base of PostgresBackend)."""

    def __init__(
        self,
        url: str,
        *,
        channel: str,
        application_name: str,
        min_size: int,
        max_size: int,
        connect_timeout: float,
    ) -> None:
        self._url, self._channel, self._app = url, channel, application_name
        self._min_size, self._max_size = min_size, max_size
        self._connect_timeout = connect_timeout
        self._pool: Any = None
        self._control: Any = None  # a one-connection pool for lease renewals
        # Connections kept checked out of the pool between statements (see _call).
        self._idle: list[Any] = []
        self._waiting = 0  # calls waiting in pool.acquire(): they get released connections
        self._closed = False
        self._subscribers: set[asyncio.Queue[str | None]] = set()  # to wake them on close()
        self._open_lock = asyncio.Lock()
        self._secrets = rules.secrets(url)
        self._safe_url = rules.redact(url)

    def _redact(self, text: str) -> str:
        return rules.scrub(text, self._secrets)

    def _unavailable(self, exc: BaseException) -> BackendUnavailable:
        detail = self._redact(f"{type(exc).__name__}: {exc}")
        return BackendUnavailable(f"PostgreSQL at {self._safe_url} is unavailable ({detail})")

    async def _open_pools(self, prepare: Callable[[Any], Awaitable[object]]) -> None:
        """Create the pools (retrying connection failures a few times), calling
        ``prepare`` (the schema migration) on a first connection. Idempotent."""
        async with self._open_lock:
            if self._pool is not None:
                return
            self._closed = False
            delays = iter(_RETRY_DELAYS)
            while True:
                try:
                    pool = await asyncpg.create_pool(
                        self._url,
                        min_size=self._min_size,
                        max_size=self._max_size,
                        server_settings={"application_name": self._app[:63]},
                        timeout=self._connect_timeout,
                        # asyncpg's default reset costs a round trip per release; our
                        # operations leave no session state (asyncpg still rolls back
                        # an open transaction and drops listeners before this runs).
                        reset=_no_reset,
                    )
                    break
                except Exception as exc:
                    if is_connection_error(exc):
                        if (delay := next(delays, None)) is None:
                            raise self._unavailable(exc) from exc
                    elif isinstance(exc, asyncpg.PostgresError):  # auth, unknown database
                        raise self._unavailable(exc) from exc
                    elif isinstance(exc, asyncpg.InterfaceError | ValueError):
                        msg = f"bad PostgreSQL URL {self._safe_url}: {self._redact(str(exc))}"
                        raise ConfigurationError(msg) from None
                    else:
                        raise
                await asyncio.sleep(delay)
            try:
                async with pool.acquire() as conn:
                    await prepare(conn)
                # Heartbeats get their own connection (opened on first use): queued
                # behind a busy pool they would land after the leases they renew.
                control = await asyncpg.create_pool(
                    self._url, min_size=0, max_size=1, reset=_no_reset,
                    timeout=self._connect_timeout,
                    server_settings={"application_name": f"{self._app}:beat"[:63]},
                )  # fmt: skip
            except BaseException as exc:
                pool.terminate()
                if is_connection_error(exc):
                    raise self._unavailable(exc) from exc
                raise
            self._pool, self._control = pool, control

    async def close(self) -> None:
        pool, self._pool, self._closed = self._pool, None, True
        control, self._control = self._control, None
        idle, self._idle = self._idle, []
        for queue in self._subscribers:
            queue.put_nowait(None)
        if pool is not None:
            try:
                for conn in idle:
                    await pool.release(conn)
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                pool.terminate()
        if control is not None:
            try:
                await asyncio.wait_for(control.close(), 10)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                control.terminate()

    async def _call(
        self, fn: Callable[[Any], Awaitable[T]], *, retry: bool, control: bool = False
    ) -> T:
        """Run ``fn(connection)`` on a pooled connection, translating failures.

        Connection failures while acquiring are always retried; once the statement
        may have been sent, only if ``retry`` (the operation is safe to repeat).
        ``control``: on the heartbeat's own connection, never queued behind steps."""
        pool = self._control if control else self._pool
        if pool is None:
            raise BackendError(f"the PostgreSQL store {self._safe_url} is not open")
        delays = iter(_RETRY_DELAYS)
        while True:
            sent, conn = False, None
            try:
                conn = None if control or not self._idle else self._pop_idle()
                if conn is None:
                    self._waiting += not control
                    try:
                        conn = await pool.acquire()
                    finally:
                        self._waiting -= not control
                sent = True
                result = await fn(conn)
            except BaseException as exc:
                if conn is not None:
                    if not isinstance(exc, asyncpg.PostgresError):
                        # Cut off mid-protocol (a cancel, a lost socket): asyncpg may have
                        # sent Parse without Sync, leaving the server in an open implicit
                        # transaction that holds table locks. Only closing ends it.
                        conn.terminate()
                    await pool.release(conn)
                if not isinstance(exc, Exception) or not is_connection_error(exc):
                    if isinstance(exc, asyncpg.PostgresError):
                        raise BackendError(f"PostgreSQL error: {self._redact(str(exc))}") from exc
                    raise
                delay = next(delays, None)
                if delay is None or (sent and not retry) or pool not in (self._pool, self._control):
                    raise self._unavailable(exc) from exc
            else:
                if pool is self._pool and not self._waiting:
                    self._idle.append(conn)
                else:  # heartbeat, or someone waits in pool.acquire(), or we closed
                    await pool.release(conn)
                return result
            await asyncio.sleep(delay)

    def _pop_idle(self) -> Any:
        """An idle connection we kept, or None.

        After a statement succeeds its connection is kept here rather than released:
        asyncpg's ``release`` costs a task and several loop turns (about 70 µs, a
        third of a step), and these connections carry no session state to reset
        (no open transaction, no listeners). Dead ones are dropped: asyncpg gives
        their slot back to the pool when their socket closes."""
        while self._idle:
            conn = self._idle.pop()
            try:
                if not conn.is_closed():
                    return conn
            except asyncpg.InterfaceError:  # "released back to the pool" on close
                continue
            conn.terminate()  # closed, not yet released: this hands its slot back
        return None

    async def _connect_listener(self) -> Any:
        """Connect for LISTEN. A cancel that lands mid-connect would leak the socket
        asyncpg is opening, so the connect is shielded and its result closed."""
        app = f"{self._app}:hints"[:63]
        connecting = asyncio.ensure_future(
            asyncpg.connect(
                self._url, timeout=self._connect_timeout, server_settings={"application_name": app}
            )
        )
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            connecting.add_done_callback(_terminate_when_connected)
            raise

    async def _listen(self) -> AsyncIterator[str]:
        """LISTEN on a dedicated connection; on loss reconnect with backoff, yield "".

        Ends when the backend is closed."""
        delay = 0.1
        while not self._closed:
            conn: Any = None
            queue: asyncio.Queue[str | None] = asyncio.Queue()  # None = connection lost
            try:
                conn = await self._connect_listener()
                conn.add_termination_listener(lambda _c, q=queue: q.put_nowait(None))
                await conn.add_listener(
                    self._channel, lambda _c, _pid, _ch, payload, q=queue: q.put_nowait(payload)
                )
            except BaseException as exc:  # a cancel too: never leave the socket open
                if conn is not None:
                    conn.terminate()
                if not (is_connection_error(exc) or isinstance(exc, asyncpg.PostgresError)):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._subscribers.add(queue)
            try:
                delay = 0.1
                # LISTEN is in place: every notification from now on reaches the queue.
                # The first "" says so; after a reconnect it also says hints may be lost.
                yield ""
                while not self._closed:
                    try:
                        async with asyncio.timeout(30):  # not wait_for: it can eat a cancel
                            item = await queue.get()
                    except TimeoutError:  # idle for long: check the connection still works
                        try:
                            await conn.execute("SELECT 1", timeout=10)
                        except Exception as exc:
                            if not is_connection_error(exc):
                                raise
                            break
                        continue
                    if item is None:
                        break
                    yield item
            finally:
                self._subscribers.discard(queue)
                if not conn.is_closed():
                    try:
                        async with asyncio.timeout(5):
                            await conn.close()
                    except BaseException:
                        conn.terminate()  # cancelled or stuck: close the socket now
                        raise


def _terminate_when_connected(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().terminate()


async def _no_reset(conn: Any) -> None:
    """Pool reset hook: nothing to undo (see ``_open_pools``)."""
    return None
