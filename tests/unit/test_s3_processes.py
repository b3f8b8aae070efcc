"""Several processes racing on one S3 store (SeaweedFS on loopback): one winner each time.

The race that matters on an object store is between processes with their own
clients and caches, each trusting only what the server's conditional writes say.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from substantial.backends import open_backend

from .. import seaweed
from ..backends import unavailable
from . import racing


@pytest.fixture
async def url() -> AsyncIterator[str]:
    try:
        url = seaweed.url(f"subtest-{uuid.uuid4().hex[:12]}")
    except Exception as exc:
        unavailable("s3", exc)
    yield url
    backend = open_backend(url)
    await backend.open()
    await backend.drop_everything()  # type: ignore[attr-defined]
    await backend.close()


async def test_processes_claim_each_run_exactly_once(url: str) -> None:
    await racing.each_run_claimed_once(url)


async def test_processes_creating_one_id_create_it_once(url: str) -> None:
    await racing.each_id_created_once(url)


async def test_processes_appending_at_one_position_have_one_winner_each_time(url: str) -> None:
    await racing.each_position_written_once(url)
