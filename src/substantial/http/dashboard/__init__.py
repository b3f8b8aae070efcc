"""The web dashboard at ``/`` (DESIGN.md section 6, "Dashboard").

One static page, one hand-written script and one stylesheet, shipped in the
wheel next to this module; no build step, nothing fetched from elsewhere. The
page is a client of the JSON API (``fetch``), so it shows exactly what the API
and the CLI show and adds no second path to the store. The server's only work
is to hand out the files, with the mount prefix (``root_path``) written into the
page so it finds the API when the app is mounted in a user's app.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

__all__ = ["routes"]

_ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
# The page must not be framed by another site, nor run a script it did not ship.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


async def page(request: Request) -> Response:
    """The page, for the runs list (``/``) and a run (``/runs/{id}``): the
    script reads the path and draws the one it names."""
    root = html.escape(request.scope.get("root_path", "").rstrip("/"), quote=True)
    body = _asset("index.html").replace("{{root}}", root)
    return HTMLResponse(body, headers=_HEADERS)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    media_type = _ASSETS.get(name)
    if media_type is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(_asset(name), media_type=media_type, headers=_HEADERS)


def routes() -> list[Route]:
    """The dashboard's routes; none under ``/api``, and none wants the token
    (the page holds no data: the script asks the API with the token)."""
    return [
        Route("/", page, methods=["GET"]),
        Route("/runs/{run_id}", page, methods=["GET"]),
        Route("/ui/{name}", asset, methods=["GET"]),
    ]
