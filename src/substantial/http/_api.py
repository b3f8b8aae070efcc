"""The routes of ``/api`` and ``/healthz`` (DESIGN.md section 6, "HTTP API").

Each handler is a thin layer over the Conductor's client API. Handlers raise;
``guarded`` turns what they raise into the error document and checks the bearer
token.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._shapes import history_doc, log_doc, summary_doc, unserved, worker_doc
from ..conductor import Conductor
from ..errors import ClientError, RunNotFound
from ._errors import ApiError, JSONResponse, answer, bad_input, error_response
from ._inputs import check_name, cursor_param, json_body, limit_param, runs_filter
from ._openapi import document

HEALTH_TIMEOUT = 5.0  # seconds /healthz waits for the store before answering 503
RESERVED_EVENTS = "substantial."  # the engine's own events (a child's outcome)
_START_KEYS = frozenset(
    {"workflow", "kwargs", "run_id", "queue", "priority", "concurrency_key", "delay", "timeout"}
)

Handler = Callable[[Request], Awaitable[Response]]


class Api:
    """The routes over one Conductor, with an optional bearer token."""

    def __init__(self, conductor: Conductor, token: str | None) -> None:
        self.conductor = conductor
        self._token = None if token is None else token.encode()

    @property
    def cap(self) -> int:
        """Largest body accepted: the conductor's payload limit."""
        return self.conductor.journal.max_payload

    def routes(self) -> list[Route]:
        api = self.guarded
        return [
            Route("/healthz", self.guarded(self.healthz, auth=False), methods=["GET"]),
            Route("/metrics", self.guarded(self.metrics, auth=False), methods=["GET"]),
            Route("/api/openapi.json", api(self.openapi), methods=["GET"]),
            Route("/api/workflows", api(self.workflows), methods=["GET"]),
            Route("/api/runs", api(self.list_runs), methods=["GET"]),
            Route("/api/runs", api(self.start), methods=["POST"]),
            Route("/api/runs/{run_id}", api(self.run), methods=["GET"]),
            Route("/api/runs/{run_id}/history", api(self.history), methods=["GET"]),
            Route("/api/runs/{run_id}/logs", api(self.logs), methods=["GET"]),
            Route("/api/runs/{run_id}/events/{name}", api(self.send), methods=["POST"]),
            Route("/api/runs/{run_id}/cancel", api(self.cancel), methods=["POST"]),
            Route("/api/runs/{run_id}/resume", api(self.resume), methods=["POST"]),
            Route("/api/runs/{run_id}/fork", api(self.fork), methods=["POST"]),
            Route("/api/workers", api(self.workers), methods=["GET"]),
        ]

    def guarded(self, handler: Handler, *, auth: bool = True) -> Handler:
        async def endpoint(request: Request) -> Response:
            if auth and not self._authorized(request):
                return error_response(
                    401,
                    "Unauthorized",
                    "this API wants the header 'Authorization: Bearer <token>'",
                    **{"WWW-Authenticate": "Bearer"},
                )
            try:
                return await handler(request)
            except Exception as exc:  # every error becomes the error document
                return answer(request, exc)

        endpoint.__name__ = handler.__name__
        return endpoint

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._token)

    # -- routes ---------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """200 while the store answers a cheap query, 503 otherwise."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await self.conductor.search_page(None, limit=1)
        except Exception as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__
            return error_response(503, "Unavailable", f"the store does not answer: {reason}")
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        """This process's Prometheus exposition (the workers it hosts count there)."""
        from .. import telemetry
        from ..errors import ConfigurationError

        try:
            body, content_type = telemetry.render_metrics()
        except ConfigurationError as exc:  # prometheus-client is not installed
            return error_response(501, "NotImplemented", str(exc))
        return Response(body, media_type=content_type)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(
            document(root_path=request.scope.get("root_path", ""), secured=self._token is not None)
        )

    async def workflows(self, request: Request) -> Response:
        found = await self.conductor.counts()  # counted by the store (Conductor.counts)
        docs = [
            {"name": name, "counts": {str(s): n for s, n in found[name].items()}}
            for name in sorted(found)
        ]
        return JSONResponse({"workflows": docs})

    async def list_runs(self, request: Request) -> Response:
        q = request.query_params
        workflow = q.get("workflow") or None
        if workflow is not None:
            check_name(workflow, "workflow")
        expr = runs_filter(q.getlist("status"), q.get("filter"))
        page = await self.conductor.search_page(
            workflow, expr, limit=limit_param(q.get("limit")), cursor=cursor_param(q.get("cursor"))
        )
        flags = await unserved(self.conductor, page.runs)  # one workers() lookup per page
        runs = [summary_doc(s, unserved=f) for s, f in zip(page.runs, flags, strict=True)]
        return JSONResponse({"runs": runs, "next_cursor": page.next_cursor})

    async def start(self, request: Request) -> Response:
        body = await json_body(request, self.cap)
        if not isinstance(body, dict):
            raise bad_input('the body must be a JSON object {"workflow", "kwargs"?, ...}')
        unknown = sorted(set(body) - _START_KEYS)
        if unknown:
            raise bad_input(f"unknown fields: {', '.join(unknown)}")
        workflow = check_name(body.get("workflow"), "workflow")
        kwargs = body.get("kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise bad_input("kwargs must be a JSON object of keyword arguments")
        queue = check_name(body.get("queue", "default"), "queue")
        run_id = body.get("run_id")
        if run_id is not None:
            run_id = check_name(run_id, "run_id")
            if await self._exists(run_id):  # 200 at once: nothing of the body applies
                return JSONResponse({"run_id": run_id}, status_code=200)
        # The store says which start made the run: of two clients racing with one new
        # run_id, one gets 201 and the other 200.
        handle, created = await self.conductor._start(
            workflow, kwargs, run_id=run_id, queue=queue, **_start_options(body)
        )
        return JSONResponse({"run_id": handle.run_id}, status_code=201 if created else 200)

    async def _exists(self, run_id: str) -> bool:
        try:
            await self.conductor.handle(run_id).status()
        except RunNotFound:
            return False
        return True

    async def run(self, request: Request) -> Response:
        found = await self.conductor.details(self._run_id(request))
        [waits] = await unserved(self.conductor, [found.summary])
        doc: dict[str, Any] = summary_doc(found.summary, unserved=waits)
        doc["kwargs"] = found.kwargs
        doc["children"] = found.children
        return JSONResponse(doc)

    async def history(self, request: Request) -> Response:
        q = request.query_params
        page = await self.conductor.history(
            self._run_id(request),
            limit=limit_param(q.get("limit")),
            cursor=q.get("cursor") or None,  # a history cursor: Conductor.history checks it
        )
        return JSONResponse(history_doc(page))

    async def logs(self, request: Request) -> Response:
        lines = await self.conductor.handle(self._run_id(request)).logs()
        return JSONResponse({"logs": [log_doc(line) for line in lines]})

    async def send(self, request: Request) -> Response:
        run_id = self._run_id(request)
        name = check_name(request.path_params["name"], "the event name")
        if name.startswith(RESERVED_EVENTS):
            raise bad_input(f"event names starting with {RESERVED_EVENTS!r} are reserved")
        value = await json_body(request, self.cap)
        await self.conductor.handle(run_id).send(name, value)
        return JSONResponse({"run_id": run_id, "event": name}, status_code=202)

    async def cancel(self, request: Request) -> Response:
        run_id = self._run_id(request)
        body = await json_body(request, self.cap, empty={})
        if not isinstance(body, dict) or set(body) - {"revert"}:
            raise bad_input('the body must be empty or {"revert": true|false}')
        revert = body.get("revert", False)
        if not isinstance(revert, bool):
            raise bad_input("revert must be true or false")
        await self.conductor.handle(run_id).cancel(revert=revert)
        return JSONResponse({"run_id": run_id}, status_code=202)

    async def resume(self, request: Request) -> Response:
        """202 once a FAILED or CANCELLED run is PENDING again; 409 for any other."""
        run_id = self._run_id(request)
        await json_body(request, self.cap, empty={})
        status = await self.conductor.handle(run_id).status()  # RunNotFound: 404
        try:
            await self.conductor.handle(run_id).resume()
        except RunNotFound:
            raise
        except ClientError as exc:
            raise ApiError(409, "RunNotResumable", f"{exc} (the run is {status})") from None
        return JSONResponse({"run_id": run_id}, status_code=202)

    async def fork(self, request: Request) -> Response:
        source = self._run_id(request)
        body = await json_body(request, self.cap)
        if not isinstance(body, dict) or set(body) - {"from_step", "run_id"}:
            raise bad_input('the body must be {"from_step": N, "run_id"?: "..."}')
        step = body.get("from_step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**31:
            raise bad_input("from_step must be a non-negative integer (a durable call's seq)")
        new_id = body.get("run_id")
        if new_id is not None:
            new_id = check_name(new_id, "run_id")
        handle = await self.conductor.fork(source, from_step=step, run_id=new_id)
        return JSONResponse({"run_id": handle.run_id}, status_code=201)

    async def workers(self, request: Request) -> Response:
        return JSONResponse({"workers": [worker_doc(w) for w in await self.conductor.workers()]})

    @staticmethod
    def _run_id(request: Request) -> str:
        return check_name(request.path_params["run_id"], "the run id")


def _start_options(body: dict[str, Any]) -> dict[str, Any]:
    """The optional flow-control fields of a start, type-checked (their values are
    checked by ``Conductor.start``, whose ClientError is a 400 too)."""
    out: dict[str, Any] = {}
    priority = body.get("priority")
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise bad_input(f"priority must be an integer, got {priority!r}")
        out["priority"] = priority
    key = body.get("concurrency_key")
    if key is not None:
        out["concurrency_key"] = check_name(key, "concurrency_key")
    for field in ("delay", "timeout"):
        seconds = body.get(field)
        if seconds is None:
            continue
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise bad_input(f"{field} must be a number of seconds >= 0, got {seconds!r}")
        out[field] = float(seconds)
    return out
