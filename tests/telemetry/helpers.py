from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CollectorRegistry

from substantial import Conductor

from ..engine.helpers import eventually, worker


@asynccontextmanager
async def serving(
    conductor: Conductor, registry: CollectorRegistry, **options: Any
) -> AsyncIterator[asyncio.Task[None]]:
    """A worker for the block, stopped only once it drives no run.

    ``result()`` returns as soon as the end record is in the store, a moment
    before the worker's stretch is over and counted (its span ended, the end
    counted, the gauge back down); stopping the worker in that moment would
    cancel the stretch after its end was written, and the counts would miss it."""
    async with worker(conductor, **options) as task:
        yield task
        await eventually(lambda: registry.get_sample_value("substantial_active_runs") == 0)
