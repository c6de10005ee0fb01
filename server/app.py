"""The composition root: `create_app(config)` wires config, storage, delivery and routes.

It is the only place that chooses implementations (the Graph transport: aiohttp in
production, the sandbox's or a test's otherwise). Nothing happens at import time; the
lifespan owns the database and the Graph client.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from prometheus_client import Gauge
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import probes, routes
from server.auth import VerifiedTokens
from server.config import Config
from server.console import pages as console_pages
from server.delivery.coalesce import Coalescer
from server.delivery.dispatcher import Dispatcher
from server.delivery.graph import GraphClient, Sender
from server.delivery.shared_backoff import SharedBackoff
from server.delivery.throttle import Breakers
from server.delivery.transport import AiohttpTransport, GraphTransport, HttpxTransport
from server.errors import (
    FunnelgateError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    StorageUnavailable,
)
from server.idempotency import Idempotency
from server.logs import (
    level_for_status,
    log,
    request_id_from_header,
    reset_request_id,
    set_request_id,
)
from server.mcp_endpoint import McpEndpoint, session_manager
from server.metrics import Metrics, serving_metrics
from server.metrics import metrics as metrics_route
from server.observe import Observers
from server.responses import error_response
from server.runner import Runner
from server.sandbox import SandboxGraph, sandbox_app
from server.storage.credentials import Credentials, keyring_of, open_credentials
from server.storage.database import ERRORS, open_database
from server.storage.outbox import Outbox
from server.tally import Latencies, Tally
from tools.catalog import load_catalog, load_openapi, served_openapi

SANDBOX_BASE_URL = "http://sandbox.funnelgate.invalid"


def create_app(  # noqa: PLR0915 - the composition root wires everything
    config: Config,
    *,
    graph_transport: GraphTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The ASGI app. `graph_transport` replaces the network to Graph (tests); by default
    Graph is reached with aiohttp, or in-process when the sandbox is on."""
    openapi = load_openapi()
    catalog = load_catalog(openapi)
    openapi_bytes = orjson.dumps(_served_document(openapi, catalog, config))
    graph_settings = config.graph
    metrics, extra_routes = _metrics(config, openapi, catalog, clock)
    if config.graph.sandbox:
        sandbox = SandboxGraph(clock=clock)
        graph_settings = dataclasses.replace(graph_settings, base_url=SANDBOX_BASE_URL)
        # Only the listing is a route: the sandbox Graph is reached as the transport, never
        # from outside (its POST read bodies unbounded and without a token).
        extra_routes.append(
            Route("/sandbox/events", routes.sandbox_events(sandbox), methods=["GET"])
        )
        if graph_transport is None:
            graph_transport = HttpxTransport(httpx.ASGITransport(app=sandbox_app(sandbox)))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        open_credentials(config.storage).close()  # the schema brought up to date, keys checked
        database = open_database(config.storage.database_path, config.storage.url)
        queue = Outbox(database, clock=clock)
        credentials = Credentials(database, keyring_of(config.storage))
        transport = graph_transport or AiohttpTransport(graph_settings.max_connections)
        tally, latencies = Tally(queue, clock=clock), Latencies()
        # The metrics and the console's counters listen here.
        observers = Observers([tally, latencies, *([metrics] if metrics is not None else [])])
        graph = GraphClient(
            graph_settings, transport, breakers=Breakers(clock=clock), observers=observers
        )
        sender: Sender = Coalescer(graph) if graph_settings.coalesce else graph
        dispatcher = Dispatcher(queue, graph, credentials, config, clock=clock)
        app.state.outbox, app.state.dispatcher = queue, dispatcher
        # What the console reads: its counters, Graph's latency, the throttled pixels.
        app.state.tally, app.state.graph_latency = tally, latencies
        app.state.breakers = graph.breakers
        app.state.idempotency = Idempotency(queue, clock=clock)
        app.state.runner = Runner(
            catalog, credentials, sender, queue, config,
            graph_url=graph.url, wake_dispatcher=dispatcher.wake, clock=clock,
            observers=observers,
        )  # fmt: skip
        app.state.mcp = session_manager()
        database.listen(dispatcher.wake)  # other instances' events, at once (PostgreSQL)
        backoff = SharedBackoff(graph.breakers, queue, clock=clock)
        dispatcher.start()
        backoff.start()
        tally.start()
        try:
            async with (
                serving_metrics(metrics, config.metrics, database),
                app.state.mcp.run(),
            ):
                yield
        finally:
            # uvicorn has finished the calls in flight (or given up on them) by now.
            await app.state.runner.drain()
            await dispatcher.stop(timeout=config.server.shutdown_seconds / 2)
            await backoff.stop()
            await tally.stop()
            await graph.aclose()
            queue.close()

    app = Starlette(
        routes=[
            Route("/projects/{project_id}/tools", routes.run_tool, methods=["POST"]),
            Route("/projects/{project_id}/actions", routes.run_action, methods=["POST"]),
            Route("/projects/{project_id}/tools", routes.list_tools, methods=["GET"]),
            Route("/projects/{project_id}/actions", routes.list_actions, methods=["GET"]),
            Route("/projects/{project_id}/events/{event_id}", routes.event_status, methods=["GET"]),
            Route("/projects/{project_id}/mcp", McpEndpoint()),
            Route("/healthz", routes.healthz, methods=["GET"]),
            Route("/readyz", probes.readyz, methods=["GET"]),
            Route("/openapi.json", routes.openapi, methods=["GET"]),
            *extra_routes,
        ],
        exception_handlers={
            FunnelgateError: _funnelgate_error,
            HTTPException: _http_error,
            **dict.fromkeys(ERRORS, _storage_error),
        },
        lifespan=lifespan,
    )
    app.state.config = config
    _add_console(app, config, clock)
    app.state.tokens = VerifiedTokens(clock=clock)
    app.state.openapi_bytes = openapi_bytes
    app.state.metrics = metrics
    app.add_middleware(
        InFlightLimit,
        limit=config.server.max_in_flight,
        gauge=None if metrics is None else metrics.in_flight,
    )
    app.add_middleware(RequestLog, metrics=metrics)
    app.add_middleware(WithoutTrailingSlash)
    return app


def _add_console(app: Starlette, config: Config, clock: Callable[[], float]) -> None:
    """The console's pages, only when a token is set up (an admin surface nobody can log in to
    is not served); they read what the lifespan puts in `app.state`."""
    if console_pages.served(config):
        app.router.routes.extend(console_pages.Console(config, app.state, clock=clock).routes())


def _metrics(
    config: Config, openapi: dict[str, Any], catalog: Mapping[str, Any], clock: Callable[[], float]
) -> tuple[Metrics | None, list[Route]]:
    """The app's metrics, when on, and their route on the main server, when they have one."""
    if not config.metrics.enabled:
        return None, []
    codes = openapi["components"]["schemas"]["EventError"]["properties"]["code"]["enum"]
    metrics = Metrics(tools=catalog, codes=codes, projects=config.projects, clock=clock)
    if config.metrics.port is not None:
        return metrics, []
    return metrics, [Route(config.metrics.path, metrics_route, methods=["GET"])]


def _served_document(
    openapi: dict[str, Any], catalog: Mapping[str, Any], config: Config
) -> dict[str, Any]:
    """openapi.json as this server serves it (tools/catalog.py), with the metrics where the
    main server serves them: at their path, or nowhere when they are off or on a port of
    their own."""
    document = served_openapi(openapi, catalog, sandbox=config.graph.sandbox)
    item = document["paths"].pop("/metrics")
    if config.metrics.enabled and config.metrics.port is None:
        document["paths"][config.metrics.path] = item
    return document


async def _funnelgate_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FunnelgateError)
    request.state.error_code = exc.code
    return error_response(exc)


async def _storage_error(request: Request, exc: Exception) -> Response:
    """A read the route made itself failed (the database went away): a documented 503."""
    log("storage_read_failed", logging.ERROR, error=type(exc).__name__)
    return await _funnelgate_error(request, StorageUnavailable(reading=True))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing misses (404, 405) answered in the same JSON shape as every other error."""
    assert isinstance(exc, HTTPException)
    if exc.status_code != 405:
        return await _funnelgate_error(request, NotFound("No such path."))
    # Starlette names only the first route of the path; several routes share one path here.
    allowed = {
        method
        for route in request.app.routes
        if isinstance(route, Route) and route.path_regex.match(request.url.path)
        for method in route.methods or ()
    }
    return await _funnelgate_error(request, MethodNotAllowed(", ".join(sorted(allowed))))


class WithoutTrailingSlash:
    """Serves `/x/` as `/x`, with no redirect.

    Clients generated from ActionKit's OpenAPI post to `.../tools/`. A 307 stops httpx-based
    clients, and behind a TLS-terminating proxy its `Location` would be `http://`, a downgrade
    that carries the Bearer token along.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if len(path) > 1 and path.endswith("/") and scope["type"] in ("http", "websocket"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
            raw = scope.get("raw_path")
            if raw:
                scope["raw_path"] = raw.rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


class InFlightLimit:
    """At most `limit` project calls in progress; past it, 503 OVERLOADED with Retry-After.

    Bounds what waits on the loop (memory, Graph connections) under a burst. Health checks
    and the OpenAPI document are never counted nor refused.
    """

    def __init__(self, app: ASGIApp, limit: int, gauge: Gauge | None = None) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0
        self.gauge = gauge  # the metrics' funnelgate_calls_in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/projects/"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            scope.setdefault("state", {})["error_code"] = Overloaded.code
            await error_response(Overloaded())(scope, receive, send)
            return
        self.in_flight += 1
        gauge = self.gauge
        if gauge is not None:
            gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if gauge is not None:
                gauge.dec()


class RequestLog:
    """One JSON log line per request; turns an unexpected exception into a JSON 500.

    Logs the endpoint's name, not the raw path, and only ids, codes and timings; counts the
    request in the metrics, when they are on.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False
        request_id = request_id_from_header(_header(scope, b"x-request-id"))
        token = set_request_id(request_id)  # on every line logged for this request
        echo = (b"x-request-id", request_id.encode())

        async def send_and_watch(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message = {**message, "headers": [*message.get("headers", ()), echo]}
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception as exc:
            log("unhandled_error", logging.ERROR, error=type(exc).__name__)
            if not response_started:
                status = 500
                scope.setdefault("state", {})["error_code"] = InternalError.code
                await error_response(InternalError())(scope, receive, send_and_watch)
        finally:
            seconds = time.perf_counter() - started
            state = scope.get("state", {})
            endpoint = scope.get("endpoint")
            if self.metrics is not None:
                self.metrics.call(
                    endpoint, state.get("tool"), status, state.get("error_code"), seconds
                )
            log(
                "request",
                level_for_status(status),
                method=scope["method"],
                endpoint=getattr(endpoint, "__name__", None),
                project=state.get("project"),
                tool=state.get("tool"),
                status=status,
                code=state.get("error_code"),
                fbtrace_id=state.get("fbtrace_id"),
                duration_ms=round(seconds * 1000, 2),
            )
            reset_request_id(token)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
