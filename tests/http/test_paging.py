"""Pages of ``GET /api/runs`` follow the store's cursor: more runs than a page,
every run once, newest first, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import orjson

from substantial import Conductor

from .conftest import serving


async def pages(conductor: Conductor, total: int, limit: int, **params: str) -> list[list[str]]:
    async with serving(conductor) as api:
        for i in range(total):
            r = await api.client.post(
                "/api/runs", json={"workflow": "unserved", "run_id": f"run-{i:02d}"}
            )
            assert r.status_code == 201
        out: list[list[str]] = []
        cursor: str | None = None
        while True:
            query = {"limit": str(limit), **params, **({"cursor": cursor} if cursor else {})}
            r = await api.client.get("/api/runs", params=query)
            assert r.status_code == 200, r.text
            body = r.json()
            out.append([s["run_id"] for s in body["runs"]])
            cursor = body["next_cursor"]
            if cursor is None:
                return out


async def test_25_runs_in_pages_of_10(any_conductor: Conductor) -> None:
    got = await pages(any_conductor, 25, 10)
    assert [len(p) for p in got] == [10, 10, 5]
    assert [run for page in got for run in page] == [f"run-{i:02d}" for i in reversed(range(25))]


async def test_a_filtered_listing_pages_too(tmp_path: Path) -> None:
    conductor = Conductor(f"sqlite:///{tmp_path}/state.db")
    odd = orjson.dumps({"run_id": {"in": [f"run-{i:02d}" for i in range(1, 25, 2)]}}).decode()
    got = await pages(conductor, 25, 5, filter=odd, status="PENDING")
    assert [len(p) for p in got] == [5, 5, 2]
    assert [run for page in got for run in page] == [
        f"run-{i:02d}" for i in reversed(range(1, 25, 2))
    ]
