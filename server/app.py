"""The composition root: `create_app(config)` wires config, storage, delivery and routes.

Nothing happens at import time; the lifespan owns the database and the Graph client.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import routes
from server.auth import VerifiedTokens
from server.config import Config
from server.delivery.coalesce import Coalescer
from server.delivery.graph import GraphClient
from server.delivery.transport import HttpxTransport
from server.errors import FunnelgateError, MethodNotAllowed, NotFound
from server.logs import elapsed_ms, log
from server.mcp_endpoint import McpEndpoint, session_manager
from server.runner import Runner
from server.sandbox import SandboxGraph, sandbox_app
from server.storage.credentials import open_credentials
from tools.catalog import OPENAPI_PATH, load_tools

SANDBOX_BASE_URL = "http://sandbox.funnelgate.invalid"


def create_app(
    config: Config,
    *,
    graph_transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The ASGI app. `graph_transport` replaces the network to Graph (tests use MockTransport)."""
    openapi_bytes = OPENAPI_PATH.read_bytes()
    tools = load_tools(orjson.loads(openapi_bytes))
    graph_settings = config.graph
    extra_routes: list[Route | Mount] = []
    if config.graph.sandbox:
        sandbox = sandbox_app(SandboxGraph(clock=clock))
        graph_settings = dataclasses.replace(graph_settings, base_url=SANDBOX_BASE_URL)
        graph_transport = graph_transport or httpx.ASGITransport(app=sandbox)
        extra_routes.append(Mount("/sandbox", app=sandbox))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        credentials = open_credentials(config.storage)
        transport = HttpxTransport(graph_transport) if graph_transport else None
        graph = GraphClient(graph_settings, transport)
        sender = Coalescer(graph) if graph_settings.coalesce else None
        app.state.runner = Runner(tools, credentials, graph, sender=sender, clock=clock)
        app.state.mcp = session_manager()
        try:
            async with app.state.mcp.run():
                # The ~100k objects of start-up (schemas, pycountry, the MCP SDK) never die:
                # out of the collector's sight, a full collection stops costing ~30 ms.
                gc.freeze()
                yield
        finally:
            await graph.aclose()
            credentials.close()

    app = Starlette(
        routes=[
            Route("/projects/{project_id}/tools", routes.run_tool, methods=["POST"]),
            Route("/projects/{project_id}/actions", routes.run_action, methods=["POST"]),
            Route("/projects/{project_id}/tools", routes.list_tools, methods=["GET"]),
            Route("/projects/{project_id}/actions", routes.list_actions, methods=["GET"]),
            Route("/projects/{project_id}/mcp", McpEndpoint()),
            Route("/healthz", routes.healthz, methods=["GET"]),
            Route("/openapi.json", routes.openapi, methods=["GET"]),
            *extra_routes,
        ],
        exception_handlers={FunnelgateError: _error_response, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.tokens = VerifiedTokens()
    app.state.openapi_bytes = openapi_bytes
    app.add_middleware(RequestLog)
    return app


async def _error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FunnelgateError)
    request.state.error_code = exc.code
    return routes.json_response(exc.body(), exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing misses (404, 405) answered in the same JSON shape as every other error."""
    assert isinstance(exc, HTTPException)
    error: FunnelgateError = (
        MethodNotAllowed("Method not allowed on this path.")
        if exc.status_code == 405
        else NotFound("No such path.")
    )
    return await _error_response(request, error)


class RequestLog:
    """One JSON log line per request; turns an unexpected exception into a JSON 500.

    Logs the endpoint's name, not the raw path, and only ids, codes and timings.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_and_watch(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception as exc:
            log("unhandled_error", logging.ERROR, error=type(exc).__name__)
            if not response_started:
                status = 500
                body = {"message": "Internal error.", "code": "INTERNAL_ERROR", "retryable": True}
                await routes.json_response(body, 500)(scope, receive, send)
        finally:
            state = scope.get("state", {})
            endpoint = scope.get("endpoint")
            log(
                "request",
                method=scope["method"],
                endpoint=getattr(endpoint, "__name__", None),
                project=state.get("project"),
                tool=state.get("tool"),
                status=status,
                code=state.get("error_code"),
                fbtrace_id=state.get("fbtrace_id"),
                duration_ms=elapsed_ms(started),
            )
