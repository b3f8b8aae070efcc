from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from substantial.backends import Backend

from .backends import ALL, make_backend


@pytest.fixture(params=ALL)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with make_backend(request.param, tmp_path) as b:
        yield b
