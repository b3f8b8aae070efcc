"""The S3 store's own behaviour beyond the shared contract: its URL, a missing bucket,
credentials, the requests a step costs, and published state across a writer's crash
and an older run object (SeaweedFS on loopback)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from typing import Any

import orjson
import pytest

from substantial.backends import NewRun, RunQuery, RunUpdate, open_backend
from substantial.backends._s3_claim import Want
from substantial.backends._s3_layout import RunDoc
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


async def _claimed_with_stale_peers(
    peers: int,
) -> tuple[S3Backend, list[tuple[S3Backend, RunDoc]], int]:
    """Run ``r`` claimed by a holder, and ``peers`` other workers holding its run object
    as it was before the claim (they listed the due index first)."""
    url = _url()
    holder = open_backend(url)
    assert isinstance(holder, S3Backend)
    await holder.open()
    new = NewRun(run_id="r", workflow="wf", queue="q", first_record=b"0", created_at=T0,
                 due_at=T0)  # fmt: skip
    await holder.create_run(new)
    stale: list[tuple[S3Backend, RunDoc]] = []
    for _ in range(peers):
        peer = open_backend(url)
        assert isinstance(peer, S3Backend)
        await peer.open()
        doc = await peer._fetch("r")
        assert doc is not None
        stale.append((peer, doc))
    [claim] = await holder.claim_due(
        queue="q", workflows=["wf"], limit=1, owner="h", lease_seconds=30, now=T0
    )
    return holder, stale, claim.token


async def _close(holder: S3Backend, stale: list[tuple[S3Backend, RunDoc]]) -> None:
    await holder.drop_everything()
    for b in (holder, *(p for p, _ in stale)):
        await b.close()


async def test_claimers_with_a_stale_run_object_leave_the_holder_s_fence_alone() -> None:
    """Their claim fails and the holder's first append is still its one request."""
    holder, stale, token = await _claimed_with_stale_peers(3)
    try:
        for peer, doc in stale:
            want = Want(queue="q", workflows={"wf"}, owner="o", lease_seconds=30, now=T0)
            assert await peer._claims.claim_doc(doc, want) is None
        before = dict(holder.requests)
        assert await holder.append("r", token=token, expected_len=1, records=[b"s"], now=T0) == 2
        spent = {op: n - before.get(op, 0) for op, n in holder.requests.items()}
        assert {op: n for op, n in spent.items() if n} == {"put_object": 1}
    finally:
        await _close(holder, stale)


async def test_the_holder_follows_its_fence_however_often_same_token_claimers_replace_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claimers of the holder's token that lost the run object to it (their fence went
    in between its fence and its run object write) re-place the fence, one just before
    each of the holder's tries: its append lands all the same, at the fenced position."""
    holder, stale, token = await _claimed_with_stale_peers(3)
    try:
        waiting = [peer for peer, _ in stale]
        real_put = holder.bucket.put

        async def raced_put(key: str, data: bytes, **kw: Any) -> str | None:
            if kw.get("if_match") and waiting:
                peer = waiting.pop()
                scan = await peer._logs.scan("r", stale[0][1].gen)
                assert scan.last is not None and scan.last.fence
                assert await peer._logs.fence("r", scan, token) is not None
            return await real_put(key, data, **kw)

        monkeypatch.setattr(holder.bucket, "put", raced_put)
        assert await holder.append("r", token=token, expected_len=1, records=[b"s"], now=T0) == 2
        assert not waiting
        snap = await holder.read("r")
        assert snap is not None and snap.log == [b"0", b"s"] and snap.run.lease_token == token
    finally:
        await _close(holder, stale)


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


async def test_a_dead_writers_published_state_is_rolled_forward_by_the_next_claimer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer's log object (its header carries the published values) lands, then
    it dies before the run object is written: the run object still shows the state
    before, and the claimer after its lease merges the values in, JSON types kept."""
    url = _url()
    writer, claimer = open_backend(url), open_backend(url)
    assert isinstance(writer, S3Backend) and isinstance(claimer, S3Backend)
    await writer.open()
    await claimer.open()
    try:
        new = NewRun(run_id="r", workflow="wf", queue="q", first_record=b"0", created_at=T0,
                     due_at=T0, state={"customer": "acme"})  # fmt: skip
        await writer.create_run(new)
        kw: dict[str, Any] = {"queue": "q", "workflows": ["wf"], "limit": 1, "owner": "w"}
        [c] = await writer.claim_due(**kw, lease_seconds=30, now=T0)

        async def dies(*args: Any, **kwargs: Any) -> None:
            raise BackendUnavailable("the writer died here")

        monkeypatch.setattr(writer, "_settle", dies)
        values = {"n": 1.0, "big": 12345678901234, "progress": {"done": 2, "of": 3}}
        with pytest.raises(BackendUnavailable):
            await writer.append("r", token=c.token, expected_len=1, records=[b"s"],
                                update=RunUpdate(state=values), now=T0)  # fmt: skip
        run = await claimer.get_run("r")
        assert run is not None and run.state == {"customer": "acme"}

        [again] = await claimer.claim_due(**kw, lease_seconds=30, now=T0 + 31)
        assert again.token == c.token + 1
        run = await claimer.get_run("r")
        assert run is not None and run.state == {"customer": "acme", **values}
        assert type(run.state["n"]) is float and type(run.state["big"]) is int
    finally:
        await claimer.drop_everything()
        await claimer.close()
        await writer.close()


async def test_a_run_object_from_before_published_state_reads_as_not_indexed() -> None:
    """No ``state`` in the object: None, so a search by state returns the run (its
    log tells), and a later append does not start an index that would miss what the
    run published before."""
    backend = open_backend(_url())
    assert isinstance(backend, S3Backend)
    await backend.open()
    try:
        new = NewRun(run_id="old", workflow="wf", queue="q", first_record=b"0", created_at=T0,
                     due_at=T0)  # fmt: skip
        await backend.create_run(new)
        key = f"{backend.prefix}runs/old"
        got = await backend.bucket.get(key)
        assert got is not None
        doc = orjson.loads(got[0])
        del doc["state"]
        await backend.bucket.put(key, orjson.dumps(doc))
        run = await backend.get_run("old")
        assert run is not None and run.state is None
        query = RunQuery(state_equals=(("customer", "acme"),))
        assert [r.run_id for r in await backend.list_runs(query)] == ["old"]

        kw: dict[str, Any] = {"queue": "q", "workflows": ["wf"], "limit": 1, "owner": "w"}
        [c] = await backend.claim_due(**kw, lease_seconds=30, now=T0)
        await backend.append("old", token=c.token, expected_len=1, records=[b"s"],
                             update=RunUpdate(state={"customer": "globex"}), now=T0)  # fmt: skip
        run = await backend.get_run("old")
        assert run is not None and run.state is None
    finally:
        await backend.drop_everything()
        await backend.close()
