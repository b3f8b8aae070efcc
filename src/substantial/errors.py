"""The exception tree.

Every error Substantial raises derives from :class:`SubstantialError`, so callers
can catch "anything from us" in one place::

    SubstantialError
    ├── ConfigurationError          bad URL, missing optional dependency, bad option
    ├── BackendError                the store failed or refused an operation
    │   ├── BackendUnavailable      cannot reach the store (after retries)
    │   ├── SchemaVersionError      the store was written by a newer Substantial
    │   ├── LeaseLost               fencing: this worker no longer owns the run
    │   └── CorruptRecord           a stored record cannot be decoded
    ├── WorkflowError               raised inside a workflow / recorded on its run
    │   ├── NonDeterminismError     replay met a different call than the log recorded
    │   ├── SaveFailed              a save() exhausted its retries
    │   └── SerializationError      a value is not JSON-serializable, or too large
    │       └── PayloadTooLarge
    ├── FilterError                 a malformed search filter (names the path)
    └── ClientError                 caller-side misuse
        ├── RunNotFound             no run has this id
        ├── RunFinished             the run already ended (send to a finished run)
        └── RunError                result() of a run that did not complete
            ├── RunFailed           (message = the run's error)
            ├── RunCancelled
            └── RunReverted

Engine control flow (suspension, cancellation) is *not* here: it derives from
``BaseException`` (see ``substantial._interrupts``) so that ``except Exception``
in user code cannot swallow it.
"""

from __future__ import annotations

from collections.abc import Sequence


class SubstantialError(Exception):
    """Root of every error raised by Substantial."""


class ConfigurationError(SubstantialError):
    """A setting, URL or optional dependency is wrong or missing."""


class BackendError(SubstantialError):
    """The store failed or refused an operation."""


class BackendUnavailable(BackendError):
    """The store cannot be reached; the message never contains credentials."""


class SchemaVersionError(BackendError):
    """The store's schema was created by a newer version of Substantial."""


class LeaseLost(BackendError):
    """This worker's lease token is no longer current: another worker owns the run."""

    def __init__(self, run_id: str, message: str | None = None) -> None:
        super().__init__(message or f"lease on run {run_id!r} was lost to another worker")
        self.run_id = run_id


class CorruptRecord(BackendError):
    """A stored log record cannot be decoded (truncated, foreign or garbage bytes)."""

    def __init__(self, run_id: str, position: int, reason: str) -> None:
        super().__init__(f"run {run_id!r}: log record #{position} is corrupt: {reason}")
        self.run_id = run_id
        self.position = position


class WorkflowError(SubstantialError):
    """An error that belongs to one run (recorded on it, or raised inside it)."""


class NonDeterminismError(WorkflowError):
    """Replay met a different durable call than the one the log recorded at that step.

    ``expected`` is the call the code makes now and ``recorded`` the log's, each
    with its kind, names and code line; ``unreached`` the recorded calls after it
    that the replay never got to."""

    def __init__(
        self,
        *,
        run_id: str,
        step: int,
        expected: str,
        recorded: str,
        unreached: Sequence[str] = (),
    ) -> None:
        tail = ""
        if unreached:
            shown = ", ".join(unreached[:5])
            more = f" and {len(unreached) - 5} more" if len(unreached) > 5 else ""
            tail = f" Recorded calls never reached: {shown}{more}."
        super().__init__(
            f"non-deterministic workflow (run {run_id!r}, step {step}): the code now calls "
            f"{expected} but the log recorded {recorded}. Workflow code must make the same "
            "durable calls in the same order on every replay; move varying logic into save()"
            f" or put new code behind c.patched().{tail}"
        )
        self.run_id = run_id
        self.step = step
        self.expected = expected
        self.recorded = recorded
        self.unreached = list(unreached)


class SaveFailed(WorkflowError):
    """A ``save()`` failed on its last allowed attempt.

    The original exception cannot be restored from the store (nothing is unpickled),
    so its type name and message are kept as fields; ``str(err)`` is the message.
    """

    def __init__(self, message: str, *, error_type: str, attempts: int, step: int) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.attempts = attempts
        self.step = step


class SerializationError(WorkflowError):
    """A value cannot be stored as JSON."""


class PayloadTooLarge(SerializationError):
    """An encoded value exceeds the configured ``max_payload_bytes``."""


class FilterError(SubstantialError):
    """A search filter is malformed; ``path`` says where (e.g. ``and[1].not``)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"invalid filter at {path or '<root>'}: {problem}")
        self.path = path
        self.problem = problem


class ClientError(SubstantialError):
    """The caller asked for something that cannot be done."""


class InvalidEvent(ClientError):
    """``send`` refused an event its run's workflow does not declare, or a payload
    that does not fit the declared type; nothing was stored."""


class RunNotFound(ClientError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r}")
        self.run_id = run_id


class RunFinished(ClientError):
    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id!r} has already finished ({status}); it accepts no events")
        self.run_id = run_id
        self.status = status


class RunError(ClientError):
    """``result()`` of a run that did not complete successfully."""

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class RunFailed(RunError):
    """The run ended FAILED; ``str(err)`` is the run's error message."""

    def __init__(self, message: str, *, run_id: str, error_type: str | None = None) -> None:
        super().__init__(message, run_id=run_id)
        self.error_type = error_type


class RunCancelled(RunError):
    pass


class RunReverted(RunError):
    pass
