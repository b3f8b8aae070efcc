"""Stores. One :class:`Backend` protocol, one module per store, :func:`open_backend` by URL.

Driver imports stay inside each store's module, so ``import substantial`` never
needs redis or asyncpg installed; a missing extra is a clear ConfigurationError.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlencode, urlsplit

from ..errors import ConfigurationError
from ._protocol import Backend, Claim, InboxItem, NewRun, RunRecord, RunUpdate, Snapshot

__all__ = [
    "Backend",
    "Claim",
    "InboxItem",
    "NewRun",
    "RunRecord",
    "RunUpdate",
    "Snapshot",
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


def open_backend(url: str | None = None) -> Backend:
    """Build a backend from a URL (not yet connected; the Conductor opens it).

    ``memory://``, ``sqlite:///relative.db`` / ``sqlite:////abs.db``,
    ``file:///dir``, ``redis://host:port/db?prefix=p``,
    ``postgresql://user@host/db?schema=s``.
    """
    url = url or default_url()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if scheme == "memory":
        from .memory import MemoryBackend

        return MemoryBackend()
    if scheme == "sqlite":
        from .sqlite import SQLiteBackend

        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigurationError("sqlite URL needs a path: sqlite:///state.db")
        return SQLiteBackend(path)
    if scheme == "file":
        from .fs import FSBackend

        if not parts.path:
            raise ConfigurationError("file URL needs a directory: file:///var/lib/substantial")
        return FSBackend(parts.path)
    if scheme in ("redis", "rediss"):
        try:
            from .redis import RedisBackend
        except ImportError as exc:
            raise _missing("redis", exc) from exc
        prefix = query.pop("prefix", "substantial")
        clean = parts._replace(query=urlencode(query)).geturl()
        return RedisBackend(clean, prefix=prefix)
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresBackend
        except ImportError as exc:
            raise _missing("postgres", exc) from exc
        schema = query.pop("schema", "substantial")
        clean = parts._replace(query=urlencode(query)).geturl()
        return PostgresBackend(clean, schema=schema)
    if scheme == "s3":
        raise ConfigurationError("the s3:// store is not available yet in this version")
    raise ConfigurationError(
        f"unknown store URL scheme {scheme!r}; expected memory, sqlite, file, redis or postgresql"
    )
