"""The bearer token, the bind rule of ``serve``, and the app mounted in another."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from substantial import Conductor
from substantial.errors import ConfigurationError
from substantial.http import check_bind, create_app, serve

from .conftest import running, serving
from .flows import ALL

TOKEN = "s3cret-token"
API_ROUTES = [
    ("GET", "/api/workflows"),
    ("GET", "/api/runs"),
    ("POST", "/api/runs"),
    ("GET", "/api/runs/x"),
    ("GET", "/api/runs/x/logs"),
    ("POST", "/api/runs/x/events/e"),
    ("POST", "/api/runs/x/cancel"),
    ("GET", "/api/openapi.json"),
]


async def test_every_api_route_wants_the_token(tmp_path: Path) -> None:
    conductor = Conductor(f"sqlite:///{tmp_path}/state.db")
    async with serving(conductor, token=TOKEN) as api:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            for method, path in API_ROUTES:
                r = await api.client.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["type"] == "Unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {TOKEN}"}
        r = await api.client.post("/api/runs", json={"workflow": "double"}, headers=good)
        assert r.status_code == 201
        r = await api.client.get(f"/api/runs/{r.json()['run_id']}", headers=good)
        assert r.status_code == 200
        assert (await api.client.get("/api/runs/x", headers=good)).status_code == 404
        assert (await api.client.get("/healthz")).status_code == 200  # open


def test_serve_refuses_a_non_loopback_address_without_a_token() -> None:
    conductor = Conductor("memory://")
    with pytest.raises(ConfigurationError, match=r"0\.0\.0\.0"):
        serve(conductor, host="0.0.0.0", port=0)
    with pytest.raises(ConfigurationError, match=r"192\.168\.1\.5"):
        check_bind("192.168.1.5", None)
    for host in ("127.0.0.1", "::1", "localhost", "127.8.0.1"):
        check_bind(host, None)
    check_bind("0.0.0.0", TOKEN)


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="empty"):
        create_app(Conductor("memory://"), token="")


async def test_mounted_in_a_users_app(tmp_path: Path) -> None:
    conductor = Conductor(f"sqlite:///{tmp_path}/state.db")
    conductor.register(*ALL)
    home = Route("/", lambda request: PlainTextResponse("the user's app"))
    app = Starlette(routes=[home, Mount("/substantial", create_app(conductor, token=TOKEN))])
    worker = conductor.run(handle_sigterm=False)
    try:
        async with running(app) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/")).text == "the user's app"
            assert (await client.get("/substantial/healthz")).status_code == 200
            assert (await client.get("/substantial/api/runs")).status_code == 401
            good = {"Authorization": f"Bearer {TOKEN}"}
            r = await client.post(
                "/substantial/api/runs",
                json={"workflow": "double", "kwargs": {"n": 4}, "run_id": "m1"},
                headers=good,
            )
            assert r.status_code == 201
            assert await conductor.handle("m1").result(timeout=30) == 8
            r = await client.get("/substantial/api/runs/m1", headers=good)
            assert r.json()["result"] == 8
            doc = (await client.get("/substantial/api/openapi.json", headers=good)).json()
            assert doc["servers"] == [{"url": "/substantial"}]
            assert (await client.get("/api/runs", headers=good)).status_code == 404
    finally:
        worker.cancel()
        await worker
        await conductor.close()
