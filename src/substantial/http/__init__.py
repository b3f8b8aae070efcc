"""The HTTP API (``pip install 'substantial[http]'``): see docs/reference/http.md.

``create_app(conductor, token=...)`` is a Starlette app whose routes are relative,
so it serves on its own (``serve``) or mounted in a user's app::

    app = Starlette(routes=[Mount("/substantial", create_app(conductor))])

Kwargs, payloads and results never reach the server's log: the access log here
names the method, the path without its query string, and the status.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

from ..conductor import Conductor
from ..errors import ConfigurationError

try:
    from starlette.applications import Starlette
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as exc:  # the http extra is not installed
    missing = (exc.name or "starlette").partition(".")[0]
    raise ConfigurationError(
        f"substantial.http needs the optional dependency '{missing}': "
        "pip install 'substantial[http]'"
    ) from exc

from . import dashboard
from ._api import Api
from ._errors import exception_handlers

if TYPE_CHECKING:
    import uvicorn

__all__ = ["check_bind", "create_app", "serve", "server_config"]

access_log = logging.getLogger("substantial.http.access")


def create_app(conductor: Conductor, *, token: str | None = None) -> Starlette:
    """The API over ``conductor``, and the dashboard at ``/``; with ``token``,
    every ``/api`` route wants ``Authorization: Bearer <token>`` (``/healthz``,
    ``/metrics`` and the dashboard's files stay open: the page asks for the
    token and sends it on its API calls)."""
    if token is not None and not token:
        raise ConfigurationError("the API token must not be empty")
    api = Api(conductor, token)
    routes = [*api.routes(), *dashboard.routes()]
    app = Starlette(routes=routes, exception_handlers=exception_handlers())
    app.add_middleware(_AccessLog)
    app.state.conductor = conductor
    return app


class _AccessLog:
    """One line per request: method, path (no query: it may hold filter values),
    status and time taken."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            ms = (time.perf_counter() - began) * 1000
            access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status, ms)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if token is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve the API on {host!r} without a token: set --token or "
            "SUBSTANTIAL_TOKEN, or listen on 127.0.0.1"
        )


def server_config(app: Any, *, host: str, port: int, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for the API: its access log off (ours replaces it: no
    query strings in the log), anything else as given."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, **{"access_log": False, **options})


def serve(
    conductor: Conductor,
    host: str = "127.0.0.1",
    port: int = 8700,
    token: str | None = None,
    **uvicorn_options: Any,
) -> None:
    """Serve the API with uvicorn until interrupted (blocking: it runs its own loop).

    Refuses (ConfigurationError) a non-loopback ``host`` without a ``token``."""
    check_bind(host, token)
    import uvicorn

    app = create_app(conductor, token=token)
    uvicorn.Server(server_config(app, host=host, port=port, **uvicorn_options)).run()
