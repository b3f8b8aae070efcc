"""SIGTERM and SIGINT before the worker's event loop handles them.

``substantial worker`` loads APP and opens its store before its loop starts, and
that can take a while (a slow import, a store still coming up). A signal in that
window would end the process the default way (SIGTERM: killed, exit 143; SIGINT:
a traceback), where DESIGN promises exit 0. So the command holds them from its
first line: the loop, once it handles them, acts on one that came early as on
any later one, and the worker stops cleanly.
"""

from __future__ import annotations

import signal
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class HeldSignals:
    """The first of SIGTERM and SIGINT received since :meth:`hold` (None: none yet)."""

    def __init__(self) -> None:
        self.first: signal.Signals | None = None

    def hold(self) -> None:
        """Note these signals from now on, until an event loop takes them over."""
        for sig in SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.first is None:
            self.first = signal.Signals(signum)
