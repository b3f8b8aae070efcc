"""Engine control flow. Derives from BaseException so user ``except Exception`` can't eat it."""

from __future__ import annotations


class Interrupt(BaseException):
    """Unwinds a workflow coroutine; never escapes the engine."""


class Suspend(Interrupt):
    """The run waits: wake it at ``due`` (epoch seconds), or on the next event if None."""

    def __init__(self, due: float | None) -> None:
        super().__init__(due)
        self.due = due


class CancelRun(Interrupt):
    """The run was cancelled by a client (or a cancelled parent)."""


class DeadlineExpired(Interrupt):
    """The run's deadline (``timeout=``) passed: it ends CANCELLED, saying so."""

    def __init__(self, deadline: float) -> None:
        super().__init__(deadline)
        self.deadline = deadline


class StopRun(Interrupt):
    """The run ended by a primitive (revert / continue_using) with a final status."""

    def __init__(
        self, status: str, result: object = None, unobserved: list[bytes] | None = None
    ) -> None:
        super().__init__(status)
        self.status = status
        self.result = result
        self.unobserved = unobserved or []  # events to hand to a continuing run
