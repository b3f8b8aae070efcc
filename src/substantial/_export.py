"""Exported run histories: the file ``substantial export`` writes and
``substantial.testing.replay`` reads (docs/reference/history-format.md).

A history is a run's log as decoded JSON records, with the few run fields a
replay needs. The file is versioned: ``format`` names it and ``version`` says
which shape; a reader refuses a version it does not know instead of guessing.
Records are kept exactly as stored, so a history replays like the run itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from ._records import Record
from .backends import RunRecord
from .errors import ClientError

__all__ = ["FORMAT", "VERSION", "HistoryFile", "RunHistory", "load_histories"]

FORMAT: Literal["substantial.history"] = "substantial.history"
VERSION: Literal[1] = 1


class RunHistory(BaseModel):
    """One run: its id, workflow, queue, status when exported, and log records."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    run_id: str
    workflow: str
    queue: str = "default"
    status: str
    created_at: float
    records: list[Record]

    @classmethod
    def of(cls, run: RunRecord, records: list[Record]) -> RunHistory:
        return cls(
            run_id=run.run_id,
            workflow=run.workflow,
            queue=run.queue,
            status=str(run.status),
            created_at=run.created_at,
            records=records,
        )


class HistoryFile(BaseModel):
    """The exported document: ``{"format", "version", "exported_at", "runs"}``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: Literal["substantial.history"] = FORMAT
    version: Literal[1] = VERSION
    exported_at: str = ""
    runs: list[RunHistory]

    @classmethod
    def of(cls, runs: list[RunHistory]) -> HistoryFile:
        return cls(exported_at=datetime.now(UTC).isoformat(), runs=runs)

    def dumps(self) -> bytes:
        return orjson.dumps(self.model_dump(), option=orjson.OPT_INDENT_2) + b"\n"


def load_histories(
    source: HistoryFile | RunHistory | dict[str, Any] | str | Path,
) -> list[RunHistory]:
    """The runs of an exported file (a path), document or single run; a
    ClientError naming what is wrong with one that is not a history."""
    if isinstance(source, RunHistory):
        return [source]
    if isinstance(source, HistoryFile):
        return list(source.runs)
    what = "the history"
    if isinstance(source, str | Path):
        what = str(source)
        try:
            data: Any = orjson.loads(Path(source).read_bytes())
        except OSError as exc:
            raise ClientError(f"cannot read {what}: {exc.strerror or exc}") from None
        except orjson.JSONDecodeError as exc:
            raise ClientError(f"{what} is not JSON: {exc}") from None
    else:
        data = source
    if not isinstance(data, dict):
        raise ClientError(f"{what} is not a Substantial history (expected a JSON object)")
    if "records" in data and "runs" not in data:
        data = {"format": FORMAT, "version": VERSION, "runs": [data]}
    if data.get("format") != FORMAT:
        raise ClientError(f"{what} is not a Substantial history (format {data.get('format')!r})")
    if data.get("version") != VERSION:
        raise ClientError(
            f"{what} is history version {data.get('version')!r}; this version reads {VERSION}"
        )
    try:
        return list(HistoryFile.model_validate(data).runs)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ClientError(f"{what}: {where}: {first['msg']}") from None
