"""413 over the conductor's payload limit, and no payloads in the server's log."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from substantial import Conductor
from substantial.http import create_app

from .conftest import running, serving
from .test_routes import error_of


async def test_bodies_over_the_default_limit_are_413(tmp_path: Path) -> None:
    conductor = Conductor(f"sqlite:///{tmp_path}/state.db")  # 1 MiB by default
    async with serving(conductor) as api:
        big = {"workflow": "double", "kwargs": {"blob": "x" * (1 << 20)}}
        error_of(await api.client.post("/api/runs", json=big), 413, "PayloadTooLarge")
        r = await api.client.post("/api/runs", json={"workflow": "approval", "run_id": "a"})
        assert r.status_code == 201
        r = await api.client.post("/api/runs/a/events/decision", json="y" * (1 << 20))
        error_of(r, 413, "PayloadTooLarge")
        assert (await api.client.get("/api/runs")).json()["runs"][0]["run_id"] == "a"


async def test_a_value_over_the_limit_inside_a_smaller_body_is_413(tmp_path: Path) -> None:
    conductor = Conductor(f"sqlite:///{tmp_path}/state.db", max_payload_bytes=2000)
    async with serving(conductor) as api:
        # The body fits (under 2000 bytes); the start record with its kwargs does not.
        body = {"workflow": "double", "kwargs": {"blob": "x" * 1960}}
        r = await api.client.post("/api/runs", json=body)
        assert "2000" in error_of(r, 413, "PayloadTooLarge")
        # A streamed body with no declared length is cut off at the limit too.
        chunks = (b'"' + b"z" * 999, b"z" * 1000, b"z" * 1000 + b'"')

        async def stream() -> AsyncIterator[bytes]:
            for c in chunks:
                yield c

        r = await api.client.post("/api/runs", content=stream())
        error_of(r, 413, "PayloadTooLarge")
        assert (await api.client.get("/api/runs")).json()["runs"] == []


async def test_payloads_kwargs_and_results_stay_out_of_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "TOPSECRET-4242"
    caplog.set_level(logging.DEBUG)
    conductor = Conductor(f"sqlite:///{tmp_path}/state.db")
    async with serving(conductor) as api:
        r = await api.client.post(
            "/api/runs", json={"workflow": "approval", "kwargs": {}, "run_id": "p"}
        )
        assert r.status_code == 201
        r = await api.client.post("/api/runs", json={"workflow": "double", "kwargs": {"s": secret}})
        assert r.status_code == 201  # the run fails (no parameter s): its error may quote it
        await api.client.post("/api/runs/p/events/decision", json={"card": secret})
        await conductor.handle("p").result(timeout=30)
        await api.client.get("/api/runs/p/logs")
        for path in ("/api/runs/p", "/api/runs"):  # the secret is served, not logged
            assert secret in (await api.client.get(path)).text
        await api.client.get("/api/runs", params={"filter": f'{{"eq": "{secret}"}}'})
        await api.client.post("/api/runs", json={"workflow": "x", "kwargs": secret})  # 400
    logged = [r for r in caplog.records if r.name.startswith("substantial.http")]
    assert any("/api/runs/p/logs" in r.getMessage() for r in logged)  # the access log
    assert not [r.getMessage() for r in logged if secret in r.getMessage()]
    assert not [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("uvicorn") and secret in r.getMessage()
    ]


async def test_an_unreachable_store_is_503_on_healthz_and_the_api() -> None:
    conductor = Conductor("postgresql://postgres@127.0.0.1:1/test")  # nothing listens there
    async with running(create_app(conductor)) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/healthz")
        assert r.status_code == 503 and r.json()["error"]["type"] == "Unavailable"
        r = await client.get("/api/runs")
        assert r.status_code == 503 and r.json()["error"]["type"] == "BackendUnavailable"
        assert "***" in r.json()["error"]["message"]  # no credentials in it
    await conductor.close()
