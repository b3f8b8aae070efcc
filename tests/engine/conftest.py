from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from substantial import Conductor

from ..backends import ALL, make_backend


@pytest.fixture(params=ALL)
async def conductor(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Conductor]:
    """A Conductor on a fresh store of each kind; its worker is started by the test."""
    async with make_backend(request.param, tmp_path) as backend:
        c = Conductor(backend)
        try:
            yield c
        finally:
            await c.close()
