"""The S3 store's one seam to the object store: a few conditional requests on a bucket.

Everything the store does is one of these calls; each maps the driver's failures to
this package's errors in one place. A failed condition (412) is an answer, not an
error: ``put`` returns None. A 409 ConditionalRequestConflict (another conditional
write on that key was in flight) is retried here with a short backoff; throttling
and 5xx answers are retried by botocore's standard retry mode. Credentials come from
the standard AWS chain (environment, config files, instance roles) and never appear
in a message: errors name the endpoint, bucket and operation only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import random
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError, BackendUnavailable, ConfigurationError

_CONFLICT_TRIES = 8


@dataclass(frozen=True, slots=True)
class Listed:
    key: str
    size: int
    modified: float  # epoch seconds
    etag: str


class Bucket:
    """An opened S3 client on one bucket."""

    def __init__(
        self, bucket: str, *, endpoint_url: str | None, region: str | None, pool: int = 64
    ) -> None:
        self.bucket = bucket
        self._endpoint = endpoint_url
        self._region = region
        self._pool = pool
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self.requests: dict[str, int] = {}  # request kind -> count, for the bench's cost model

    def _where(self) -> str:
        return f"s3://{self.bucket} at {self._endpoint or 'AWS'}"

    async def open(self) -> None:
        if self._client is not None:
            return
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise ConfigurationError(
                "this store needs the optional dependency 'aiobotocore': "
                "pip install 'substantial[s3]'"
            ) from exc
        config = AioConfig(
            max_pool_connections=self._pool,
            retries={"mode": "standard", "max_attempts": 3},  # botocore's default
            connect_timeout=5,
            read_timeout=30,
            s3={"addressing_style": "path"},
            # checksums of every body cost CPU per request; S3 needs them only where
            # an operation requires them, and TLS (or the loopback) guards the rest
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = AsyncExitStack()
        self._client = await stack.enter_async_context(
            get_session().create_client(
                "s3", endpoint_url=self._endpoint, region_name=self._region, config=config
            )
        )
        self._stack = stack
        _cache_endpoints(self._client)
        try:
            await self._call("head_bucket", Bucket=self.bucket)
        except _Missing:
            await self.close()
            raise ConfigurationError(
                f"the bucket {self.bucket!r} does not exist at {self._endpoint or 'AWS'}; "
                "create it first (Substantial never creates a bucket)"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _call(self, op: str, **kw: Any) -> Any:
        """One request; 409 conflicts retried; failures mapped to our errors."""
        from aiohttp import ClientError as HTTPError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if self._client is None:
            raise BackendError(f"{self._where()}: the store is not open")
        self.requests[op] = self.requests.get(op, 0) + 1
        for attempt in range(_CONFLICT_TRIES):
            try:
                return await getattr(self._client, op)(**kw)
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if status == 412 or code == "PreconditionFailed":
                    raise _Failed from None
                if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
                    raise _Missing(code) from None
                if status == 409 and attempt + 1 < _CONFLICT_TRIES:
                    await asyncio.sleep(0.005 * 2**attempt * (0.5 + random.random()))
                    continue
                if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId"):
                    raise ConfigurationError(
                        f"{self._where()} refused the credentials ({op}: {code})"
                    ) from None
                raise BackendUnavailable(f"{self._where()}: {op} failed ({code})") from None
            except NoCredentialsError:
                raise ConfigurationError(
                    f"{self._where()}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or a profile, or an instance role)"
                ) from None
            except BotoCoreError as exc:
                raise BackendUnavailable(
                    f"{self._where()} is unreachable ({op}: {type(exc).__name__})"
                ) from None
            except (TimeoutError, OSError, HTTPError) as exc:
                raise BackendUnavailable(
                    f"{self._where()} is unreachable ({op}: {type(exc).__name__})"
                ) from None
        raise BackendUnavailable(f"{self._where()}: {op} kept conflicting")  # pragma: no cover

    # -- the calls the store makes -------------------------------------------------

    async def get(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag; None if there is none."""
        try:
            r = await self._call("get_object", Bucket=self.bucket, Key=key)
        except _Missing:
            return None
        async with r["Body"] as body:
            data: bytes = await body.read()
        return data, str(r["ETag"])

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_absent: bool = False
    ) -> str | None:
        """Write the object; with a condition (``if_match`` an ETag, or ``if_absent``),
        only if it holds. The new ETag, or None when the condition failed.

        Every PUT carries Content-MD5: the server then refuses a body that did not
        arrive whole. Without it, a client killed between its headers and its body
        can leave an *empty* object behind on some servers (SeaweedFS 4 does), and
        an empty run object or log record would be a run lost."""
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data, "ContentMD5": md5}
        if if_match is not None:
            kw["IfMatch"] = if_match
        elif if_absent:
            kw["IfNoneMatch"] = "*"
        try:
            r = await self._call("put_object", **kw)
        except _Failed:
            return None
        except _Missing:  # If-Match on an object deleted meanwhile
            return None
        return str(r["ETag"])

    async def delete(self, key: str, *, if_match: str | None = None) -> bool:
        """Delete the object (only if its ETag is ``if_match``, when given); False
        if that condition failed. A missing object counts as deleted."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match is not None:
            kw["IfMatch"] = if_match
        try:
            await self._call("delete_object", **kw)
        except _Missing:
            return True
        except _Failed:
            return False
        return True

    async def delete_many(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[i : i + 1000]]
            if chunk:
                await self._call(
                    "delete_objects", Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True}
                )

    async def list(
        self, prefix: str, *, after: str | None = None, limit: int | None = None
    ) -> list[Listed]:
        """The keys under ``prefix`` in key order (after ``after``), up to ``limit``."""
        out: list[Listed] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if limit is not None:
                kw["MaxKeys"] = min(1000, limit - len(out))
            if token is not None:
                kw["ContinuationToken"] = token
            elif after is not None:
                kw["StartAfter"] = after
            try:
                r = await self._call("list_objects_v2", **kw)
            except _Missing:
                return out
            for o in r.get("Contents", ()):
                out.append(
                    Listed(o["Key"], int(o["Size"]), o["LastModified"].timestamp(), o["ETag"])
                )
            token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
            if token is None or (limit is not None and len(out) >= limit):
                return out


def _cache_endpoints(client: Any) -> None:
    """Let botocore's endpoint cache work: it is keyed by every ruleset parameter, and
    ``Key`` and ``Prefix`` are parameters no S3 rule reads, so each new key missed the
    cache and re-ran the rules engine, a third of a request's CPU (botocore#3528).
    Dropping them from the parameters changes no endpoint. A botocore without this
    internal is left as it is."""
    resolver = getattr(client, "_ruleset_resolver", None)
    original = getattr(resolver, "_get_provider_params", None)
    if original is None or not inspect.iscoroutinefunction(original):
        return

    async def params(*args: Any, **kwargs: Any) -> Any:
        found = await original(*args, **kwargs)
        if isinstance(found, dict):
            for unused in ("Key", "Prefix", "CopySource"):
                found.pop(unused, None)
        return found

    setattr(resolver, "_get_provider_params", params)  # noqa: B010


class _Failed(Exception):
    """A request's condition did not hold (HTTP 412)."""


class _Missing(Exception):
    """No such key or bucket (HTTP 404)."""
