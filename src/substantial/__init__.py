"""Substantial: brokerless durable execution for Python.

Workflows are plain ``async`` functions; their progress lives in an append-only
log in a store you already have. See ``Conductor`` to run them and ``Context``
for what a workflow may do (and the determinism rules).
"""

from __future__ import annotations

from ._context import ChildHandle, Context
from ._history import History, HistoryEntry
from ._queues import Queue
from ._types import LogRecord, Retry, RunStatus, RunSummary, ScheduleInfo, WorkerInfo
from .conductor import Conductor, RunHandle
from .errors import (
    BackendError,
    ClientError,
    ConfigurationError,
    FilterError,
    InvalidEvent,
    NonDeterminismError,
    PayloadTooLarge,
    RunCancelled,
    RunError,
    RunFailed,
    RunFinished,
    RunNotFound,
    RunReverted,
    SaveFailed,
    SerializationError,
    SubstantialError,
    WorkflowError,
)
from .workflow import Workflow, workflow

__all__ = [
    "BackendError",
    "ChildHandle",
    "ClientError",
    "Conductor",
    "ConfigurationError",
    "Context",
    "FilterError",
    "History",
    "HistoryEntry",
    "InvalidEvent",
    "LogRecord",
    "NonDeterminismError",
    "PayloadTooLarge",
    "Queue",
    "Retry",
    "RunCancelled",
    "RunError",
    "RunFailed",
    "RunFinished",
    "RunHandle",
    "RunNotFound",
    "RunReverted",
    "RunStatus",
    "RunSummary",
    "SaveFailed",
    "ScheduleInfo",
    "SerializationError",
    "SubstantialError",
    "WorkerInfo",
    "Workflow",
    "WorkflowError",
    "workflow",
]
