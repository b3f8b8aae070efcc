"""Tools for testing workflows: a virtual clock, step stubs, replay checks and a
crash matrix (DESIGN.md section 8; docs/how-to/test-workflows.md).

``TestEnvironment`` runs workflows on a memory store (or any store) with time
that skips to the next timer when every run waits; ``replay`` checks a recorded
history against today's code; ``crash_matrix`` kills worker processes at every
step boundary and counts effects.
"""

from __future__ import annotations

from .._export import HistoryFile, RunHistory, load_histories
from ._crash import POINTS, CrashCase, CrashMatrix, crash_matrix
from ._environment import TestEnvironment
from ._replay import Replayed, replay, replay_run

__all__ = [
    "POINTS",
    "CrashCase",
    "CrashMatrix",
    "HistoryFile",
    "Replayed",
    "RunHistory",
    "TestEnvironment",
    "crash_matrix",
    "load_histories",
    "replay",
    "replay_run",
]
