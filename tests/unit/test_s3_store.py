"""The S3 store's own behaviour beyond the shared contract: its URL, a missing bucket,
credentials, and the requests a step costs (SeaweedFS on loopback)."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest

from substantial.backends import NewRun, open_backend
from substantial.backends.s3 import S3Backend
from substantial.errors import BackendUnavailable, ConfigurationError

from .. import seaweed
from ..backends import unavailable

T0 = 1_700_000_000.0


def test_an_s3_url_names_the_bucket_prefix_and_options() -> None:
    backend = open_backend(
        "s3://my-bucket/jobs/eu?endpoint_url=http://127.0.0.1:9000&region=eu-west-1&poll_interval=5"
    )
    assert isinstance(backend, S3Backend)
    assert backend.bucket.bucket == "my-bucket" and backend.prefix == "jobs/eu/"
    assert backend.poll_interval == 5.0


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3:///jobs", "needs a bucket"),
        ("s3://AKIAEXAMPLE:s3cr3t-key@bucket/jobs", "carry no credentials"),
        ("s3://bucket/jobs?endpoint=http://x", "unknown s3:// URL option 'endpoint'"),
        ("s3://bucket/jobs?poll_interval=-1", "invalid value"),
    ],
)
def test_a_bad_s3_url_is_a_configuration_error(url: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        open_backend(url)
    assert "s3cr3t-key" not in str(info.value)


def _url(bucket: str = seaweed.BUCKET) -> str:
    try:
        endpoint = seaweed.endpoint()
    except Exception as exc:
        unavailable("s3", exc)
    return f"s3://{bucket}/subtest-{uuid.uuid4().hex[:12]}?endpoint_url={endpoint}&region=us-east-1"


async def test_a_missing_bucket_is_named_and_never_created() -> None:
    backend = open_backend(_url("no-such-bucket"))
    with pytest.raises(ConfigurationError, match="'no-such-bucket' does not exist"):
        await backend.open()
    again = open_backend(_url("no-such-bucket"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        await again.open()  # still missing: the first open created nothing


async def test_a_step_costs_one_conditional_put() -> None:
    backend = open_backend(_url())
    assert isinstance(backend, S3Backend)
    await backend.open()
    try:
        new = NewRun(run_id="r", workflow="wf", queue="q", first_record=b"0", created_at=T0,
                     due_at=T0)  # fmt: skip
        await backend.create_run(new)
        [claim] = await backend.claim_due(
            queue="q", workflows=["wf"], limit=1, owner="w", lease_seconds=30, now=T0
        )
        before = dict(backend.requests)
        for i in range(5):
            await backend.append("r", token=claim.token, expected_len=1 + i, records=[b"x"], now=T0)
        spent = {op: n - before.get(op, 0) for op, n in backend.requests.items()}
        assert {op: n for op, n in spent.items() if n} == {"put_object": 5}
        snap = await backend.read("r")
        assert snap is not None and snap.log == [b"0", *[b"x"] * 5]
    finally:
        await backend.drop_everything()
        await backend.close()


async def test_an_unreachable_endpoint_is_backend_unavailable_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-key-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = open_backend(f"s3://bucket/p?endpoint_url=http://127.0.0.1:{port}&region=us-east-1")
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}") as info:
        await backend.open()
    assert "s3cr3t-key-value" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)


async def test_a_slow_claim_pass_ends_early_and_the_next_takes_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every run a pass claims is on its lease from the pass's start, and none is
    renewed before the pass returns: so a pass stops claiming after a quarter lease
    (half a second at least), here with every GET slowed to a quarter second."""
    backend = open_backend(_url())
    assert isinstance(backend, S3Backend)
    await backend.open()
    try:
        for i in range(40):
            new = NewRun(run_id=f"r{i:02}", workflow="wf", queue="q", first_record=b"0",
                         created_at=T0, due_at=T0)  # fmt: skip
            await backend.create_run(new)
        real_get = backend.bucket.get

        async def slow_get(key: str) -> tuple[bytes, str] | None:
            await asyncio.sleep(0.25)
            return await real_get(key)

        monkeypatch.setattr(backend.bucket, "get", slow_get)
        kw = {"queue": "q", "workflows": ["wf"], "limit": 40, "owner": "w", "lease_seconds": 2.0}
        first = await backend.claim_due(**kw, now=T0)  # type: ignore[arg-type]
        assert 0 < len(first) < 40
        second = await backend.claim_due(**kw, now=T0)  # type: ignore[arg-type]
        assert second and not {c.run_id for c in first} & {c.run_id for c in second}
    finally:
        await backend.drop_everything()
        await backend.close()
