"""Substantial: brokerless durable execution for Python."""

from __future__ import annotations

from ._types import LogRecord, Retry, RunStatus, RunSummary

__all__ = ["LogRecord", "Retry", "RunStatus", "RunSummary"]
