"""Declared events: ``@workflow(events={"approved": bool})`` checked at ``send``.

The check runs in the client, before the event is stored: a misspelled name or a
payload of the wrong shape is refused with an error that says which, instead of
waiting in the run's inbox for a ``receive`` that never asks for it. A run's
``receive`` turns the stored JSON back into the declared type. Workflows that
declare nothing accept any name and any JSON payload, as before.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .codec import adapter, to_json
from .errors import InvalidEvent
from .workflow import Workflow

__all__ = ["checked_event"]


def checked_event(wf: Workflow[Any], name: str, value: Any) -> Any:
    """The payload to store for event ``name`` sent to a run of ``wf`` (its JSON
    form, once validated); InvalidEvent if ``wf`` declares events and this is
    not one of them or its payload does not fit."""
    declared = wf.events
    if declared is None:
        return value
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        raise InvalidEvent(
            f"workflow {wf.name!r} declares no event {name!r} (it declares: {known}); "
            "nothing was sent"
        )
    try:
        typed = adapter(declared[name]).validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        detail = f"{where}: {first['msg']}" if where else first["msg"]
        raise InvalidEvent(
            f"event {name!r} of workflow {wf.name!r} takes {_type_name(declared[name])}; "
            f"{detail} (got {value!r:.60}); nothing was sent"
        ) from None
    return to_json(typed, what=f"send({name!r}) value")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)
