"""The public surface is deliberate: this test pins it."""

from __future__ import annotations

import substantial
from substantial import errors


def test_public_names_are_pinned_and_sorted() -> None:
    assert substantial.__all__ == sorted(substantial.__all__)
    assert set(substantial.__all__) >= {
        "Conductor",
        "Context",
        "Retry",
        "RunHandle",
        "RunStatus",
        "RunSummary",
        "LogRecord",
        "SubstantialError",
        "RunFailed",
        "RunCancelled",
        "RunReverted",
        "workflow",
    }
    for name in substantial.__all__:
        assert hasattr(substantial, name), name


def test_every_error_derives_from_substantial_error() -> None:
    for name in dir(errors):
        obj = getattr(errors, name)
        ours = isinstance(obj, type) and obj.__module__ == errors.__name__
        if ours and issubclass(obj, Exception):
            assert issubclass(obj, substantial.SubstantialError), name


def test_run_status_is_a_str_enum_with_the_contract_values() -> None:
    assert [s.value for s in substantial.RunStatus] == [
        "PENDING",
        "RUNNING",
        "SUSPENDED",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "REVERTED",
        "CONTINUED",
    ]
    assert substantial.RunStatus.COMPLETED == "COMPLETED"
