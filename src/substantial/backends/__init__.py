"""Stores. One :class:`Backend` protocol, one module per store, :func:`open_backend` by URL.

Driver imports stay inside each store's module, so ``import substantial`` never
needs redis or asyncpg installed; a missing extra is a clear ConfigurationError.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..errors import ConfigurationError
from ._protocol import (
    ALL_RUNS,
    Append,
    AppendsInBatches,
    Backend,
    Claim,
    Claims,
    CountsRuns,
    InboxItem,
    JoinsTransactions,
    KnowsNextDue,
    Migrates,
    NewRun,
    PagesLog,
    QueueLimits,
    RunCounts,
    RunQuery,
    RunRecord,
    RunUpdate,
    Snapshot,
    WorkerRecord,
)

__all__ = [
    "ALL_RUNS",
    "Append",
    "AppendsInBatches",
    "Backend",
    "Claim",
    "Claims",
    "CountsRuns",
    "InboxItem",
    "JoinsTransactions",
    "KnowsNextDue",
    "Migrates",
    "NewRun",
    "PagesLog",
    "QueueLimits",
    "RunCounts",
    "RunQuery",
    "RunRecord",
    "RunUpdate",
    "Snapshot",
    "WorkerRecord",
    "default_url",
    "open_backend",
]


def default_url() -> str:
    """``SUBSTANTIAL_BACKEND`` if set, else SQLite under ``./.substantial/``."""
    return os.environ.get("SUBSTANTIAL_BACKEND") or "sqlite:///.substantial/state.db"


def _missing(extra: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"this store needs the optional dependency '{exc.name}': pip install 'substantial[{extra}]'"
    )


def _flag(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


# Our own options per scheme: name -> parser (the parsed value goes to the constructor).
_OWN: dict[str, dict[str, Callable[[str], Any]]] = {
    "memory": {},
    "sqlite": {"poll_interval": _positive, "busy_timeout": _positive},
    "file": {"poll_interval": _positive, "fsync": _flag},
    "s3": {"endpoint_url": str, "region": str, "poll_interval": _positive},
    "redis": {"prefix": str, "poll_interval": _positive, "max_connections": int},
    "postgresql": {
        "schema": str,
        "poll_interval": _positive,
        "min_size": _count,
        "max_size": int,
        "connect_timeout": _positive,
        "application_name": str,
    },
}
# Driver options passed through in the URL, curated: a typo must not reach the driver
# (redis-py turns it into a TypeError, asyncpg into a server setting the server refuses).
_REDIS_DRIVER = frozenset({
    "db", "username", "password", "client_name", "socket_timeout", "socket_connect_timeout",
    "socket_keepalive", "retry_on_timeout", "health_check_interval",
})  # fmt: skip
_REDIS_TLS = frozenset({
    "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile", "ssl_ca_certs", "ssl_check_hostname",
})  # fmt: skip
_LIBPQ = frozenset({
    "host", "port", "dbname", "database", "user", "password", "passfile", "service",
    "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "target_session_attrs",
    "krbsrvname", "gsslib",
})  # fmt: skip
_DRIVER: dict[str, frozenset[str]] = {
    "redis": _REDIS_DRIVER,
    "rediss": _REDIS_DRIVER | _REDIS_TLS,
    "postgresql": _LIBPQ,
}


def _options(scheme: str, query: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Split a URL query into our parsed options and the driver's, refusing unknown names.

    Values are never quoted in errors (a query may hold a password)."""
    family = "redis" if scheme in ("redis", "rediss") else scheme
    own_parsers = _OWN[family]
    driver_names = _DRIVER.get(scheme, frozenset())
    own: dict[str, Any] = {}
    driver: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in own_parsers:
            try:
                own[name] = own_parsers[name](value)
            except ValueError:
                raise ConfigurationError(
                    f"{scheme}:// URL option {name!r} has an invalid value"
                ) from None
        elif name in driver_names:
            driver[name] = value
        else:
            known = sorted({*own_parsers, *driver_names})
            listing = ", ".join(known) if known else "none"
            raise ConfigurationError(
                f"unknown {scheme}:// URL option {name!r}; known options: {listing}"
            )
    return own, driver


def _with_query(parts: Any, driver: Mapping[str, str]) -> str:
    return str(parts._replace(query=urlencode(driver)).geturl())


def _s3(parts: Any, own: dict[str, Any]) -> Backend:
    """``s3://bucket/prefix``: the bucket must exist; credentials never in the URL."""
    if parts.username or parts.password:
        raise ConfigurationError(
            "s3:// URLs carry no credentials; they come from the standard AWS chain "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role)"
        )
    bucket = parts.hostname or ""
    if not bucket:
        raise ConfigurationError("s3 URL needs a bucket: s3://bucket/prefix?endpoint_url=...")
    try:
        import aiobotocore  # noqa: F401  (imported when the store opens; checked now)
    except ImportError as exc:
        raise _missing("s3", exc) from exc
    from .s3 import S3Backend

    return S3Backend(bucket, parts.path.strip("/"), **own)


def open_backend(url: str | None = None) -> Backend:
    """Build a backend from a URL (not yet connected; the Conductor opens it).

    ``memory://``, ``sqlite:///relative.db`` / ``sqlite:////abs.db``,
    ``file:///dir``, ``redis://host:port/db?prefix=p``,
    ``postgresql://user@host/db?schema=s``, ``s3://bucket/prefix?endpoint_url=...``.
    ``None`` means :func:`default_url`;
    an empty URL or an unknown query option is a ConfigurationError.
    """
    if url is None:
        url = default_url()
    if not url.strip():
        raise ConfigurationError(
            "the store URL is empty; pass None for the default, or e.g. 'sqlite:///state.db'"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "postgres":
        scheme = "postgresql"
    if scheme not in _OWN and scheme != "rediss":
        raise ConfigurationError(
            f"unknown store URL scheme {scheme!r}; expected memory, sqlite, file, redis, "
            "postgresql or s3"
        )
    own, driver = _options(scheme, parts.query)
    if scheme == "memory":
        from .memory import MemoryBackend

        return MemoryBackend()
    if scheme == "sqlite":
        from .sqlite import SQLiteBackend

        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigurationError("sqlite URL needs a path: sqlite:///state.db")
        return SQLiteBackend(path, **own)
    if scheme == "file":
        from .fs import FSBackend

        if not parts.path:
            raise ConfigurationError("file URL needs a directory: file:///var/lib/substantial")
        return FSBackend(parts.path, **own)
    if scheme == "s3":
        return _s3(parts, own)
    if scheme in ("redis", "rediss"):
        try:
            from .redis import RedisBackend
        except ImportError as exc:
            raise _missing("redis", exc) from exc
        return RedisBackend(_with_query(parts, driver), **own)
    try:
        from .postgres import PostgresBackend
    except ImportError as exc:
        raise _missing("postgres", exc) from exc
    return PostgresBackend(_with_query(parts, driver), **own)
