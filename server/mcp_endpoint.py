"""The MCP endpoint: `/projects/{project_id}/mcp`, Streamable HTTP, official `mcp` SDK.

`tools/list` mirrors List Tools, adding what MCP hosts show and check: a `title`, behaviour
`annotations`, and an `outputSchema` where the answer is always JSON. `tools/call` goes
through the same Runner as Run Tool; its failures come back as `isError` results carrying
the same `message` and `code`, while an unknown tool is a JSON-RPC error (-32602), as the MCP
specification (2025-06-18, "Tools", Error Handling) asks. The same Bearer JWT authenticates
every HTTP request, and its JWT Permissions (server/permissions.py) hide the tools of an
integration it may not use; `X-Paragon-Credential` picks the credential of a `tools/call`, as
on Run Tool. Stateless, JSON responses: nothing is kept between requests, so any
worker can answer any request.

Before the SDK sees a POST, its body meets Run Tool's rules (server/bodies.py): JSON only, at
most 1 MiB counted while reading, parsed by orjson, which refuses `NaN`, `Infinity` and
`1e400` that the SDK's parsers accept (a `NaN` reached Meta as `null`). It must also be one
JSON-RPC message: the SDK's own refusal of a malformed one quotes the values it was sent.
The bounded body is then replayed to the SDK, which parses it again. The SDK keeps integers
exact: one beyond 64 bits (which Graph's serialiser cannot write) is refused by the Runner's
validation (server/validation.py) as a tool error naming its path, for the model to correct.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import mcp_types as types
import orjson
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from server.access import authenticate
from server.bodies import MAX_BODY_BYTES, read_json_body
from server.errors import (
    BadRequest,
    FunnelgateError,
    IntegrationNotEnabled,
    InternalError,
    MethodNotAllowed,
)
from server.logs import clip, log
from server.responses import error_response, jsonrpc_error_response
from server.routes import selector_of
from server.runner import Access, Queued, Runner, unknown_tool
from tools.base import JsonAnswer, as_json
from tools.catalog import Entry, inline_refs

SETUP_HINT = (
    "This user has no Meta access token in funnelgate. An administrator can add one with "
    "`funnelgate credentials set --project P --user U --access-token-file F`, or set the "
    "project's facebook_access_token."
)


# Every tool adds events to a pixel at Meta: it changes the world (not read-only), only by
# adding (not destructive), outside funnelgate (open world). Not idempotent: a call without
# an event id gets a fresh one, so the same arguments sent twice make two events; only
# calls that carry their own ids are deduplicated by Meta, and a hint is per tool, not per call.
ANNOTATIONS = types.ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
)


def describe_tools(catalog: Mapping[str, Entry], openapi: Mapping[str, Any]) -> list[types.Tool]:
    """The catalog as MCP tools. A tool that presents Meta's answer as is (`as_json`) always
    answers JSON, so it promises openapi.json's `EventsReceived`; one with its own presenter
    may answer text (meta_send_conversion_event's markdown), and a schema would oblige every
    answer to carry structured content."""
    schemas = openapi["components"]["schemas"]
    # An outputSchema stands alone: clients resolve `$ref` only within it.
    events_received = inline_refs(schemas["EventsReceived"], schemas)
    return [
        types.Tool(
            name=name,
            title=entry.tool.title,
            description=entry.tool.description,
            input_schema=dict(entry.schema),
            output_schema=events_received if entry.tool.present is as_json else None,
            annotations=ANNOTATIONS,
        )
        for name, entry in catalog.items()
    ]


def _request(ctx: ServerRequestContext[Any, Any]) -> Request:
    request = ctx.request
    assert isinstance(request, Request), "funnelgate serves MCP over HTTP only"
    return request


def _error_result(error: FunnelgateError) -> types.CallToolResult:
    content: list[types.ContentBlock] = [
        types.TextContent(text=orjson.dumps(error.body()).decode())
    ]
    if isinstance(error, IntegrationNotEnabled):
        content.append(types.TextContent(text=SETUP_HINT))
    return types.CallToolResult(content=content, is_error=True)


async def _call_tool(
    ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    request = _request(ctx)
    state = request.state
    runner: Runner = request.app.state.runner
    name = params.name
    state.tool = clip(name)  # for the request log
    if name not in runner.catalog:
        unknown = unknown_tool(name)
        state.error_code = unknown.code
        raise MCPError(types.INVALID_PARAMS, unknown.message, data=unknown.body())
    arguments = params.arguments or {}
    try:
        answer = await runner.run(
            state.project_obj, state.user_id, name, arguments,
            access=state.access,
        )  # fmt: skip
    except FunnelgateError as exc:
        state.error_code = exc.code
        return _error_result(exc)
    except Exception as exc:
        # A bug. Left to the SDK it becomes JSON-RPC error 0 quoting the exception's text
        # (which may hold customer data) and a traceback on stderr; answer as Run Tool does.
        log("unhandled_error", logging.ERROR, error=type(exc).__name__)
        error = InternalError()
        state.error_code = error.code
        return _error_result(error)
    if isinstance(answer, Queued | JsonAnswer):
        # A queued answer carries `events_received` too: it fits EventsReceived.
        body = (
            answer.body(state.project_obj.id) if isinstance(answer, Queued) else dict(answer.body)
        )
        state.fbtrace_id = body.get("fbtrace_id")
        # MCP 2025-06-18, Tools, Structured Content: the same JSON as text too, for clients
        # that read only `content`.
        return types.CallToolResult(
            content=[types.TextContent(text=orjson.dumps(body).decode())], structured_content=body
        )
    return types.CallToolResult(content=[types.TextContent(text=answer.text)])


def _no_schema_check(_name: str) -> None:
    """funnelgate validates arguments itself (the Runner). Without this hook the SDK would
    run `tools/list` on every 2026-07-28 call to look for `x-mcp-header` annotations, which
    funnelgate's schemas never carry."""
    return None


def session_manager() -> StreamableHTTPSessionManager:
    """A fresh manager; its `run()` belongs in the app's lifespan (it can run once only)."""
    listing: list[types.Tool] = []  # built on first use: it needs the app's catalog

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        request = _request(ctx)
        catalog = request.app.state.runner.catalog
        if not listing:
            openapi = orjson.loads(request.app.state.openapi_bytes)
            listing.extend(describe_tools(catalog, openapi))
        permissions = request.state.access.permissions
        if not permissions.restricted:
            return types.ListToolsResult(tools=listing)
        return types.ListToolsResult(
            tools=[
                tool
                for tool in listing
                if permissions.may_use_integration(catalog[tool.name].tool.integration.name)
            ]
        )

    server = Server(
        "funnelgate",
        version="0.1.0",
        on_list_tools=list_tools,
        on_call_tool=_call_tool,
        get_tool_input_schema=_no_schema_check,
    )
    return StreamableHTTPSessionManager(
        app=server, stateless=True, json_response=True, max_request_body_size=MAX_BODY_BYTES
    )


def _check_message(message: Any) -> None:
    """One JSON-RPC message, by the SDK's own models. Key presence decides what it is (JSON-RPC
    2.0, section 4.1: a notification has no "id"), so a request with a malformed id is refused
    rather than taken for a notification and dropped."""
    try:
        if isinstance(message, dict) and "id" in message and "method" in message:
            types.JSONRPCRequest.model_validate(message, by_name=False)
        else:
            types.jsonrpc_message_adapter.validate_python(message, by_name=False)
    except ValidationError:
        raise BadRequest(
            "The request body is not a JSON-RPC 2.0 message.", code="INVALID_REQUEST"
        ) from None


def _replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` for the SDK: the body already read, in one message, then the connection."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class McpEndpoint:
    """ASGI app for the MCP route: authenticates, reads the body under Run Tool's rules, then
    hands over to the session manager.

    A class instance, not a function: Starlette routes a plain function as a GET-only
    request/response endpoint.
    """

    def __init__(self) -> None:
        self.__name__ = "mcp"  # the endpoint's name in the request log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            # Stateless with JSON answers: no SSE stream to GET (it would hold a connection
            # open with nothing to send) and no session to DELETE.
            scope.setdefault("state", {})["error_code"] = MethodNotAllowed.code
            await error_response(MethodNotAllowed("POST"))(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        request = Request(scope, recording)
        try:
            project, user_id, permissions = authenticate(request)
            selector = selector_of(request)
        except FunnelgateError as exc:
            request.state.error_code = exc.code
            await error_response(exc)(scope, receive, send)
            return
        request.state.project_obj = project
        request.state.user_id = user_id
        request.state.access = Access(selector, permissions)
        try:
            _check_message(await read_json_body(request))
        except FunnelgateError as exc:
            request.state.error_code = exc.code
            await jsonrpc_error_response(exc)(scope, receive, send)
            return
        receive = _replaying(b"".join(chunks), receive)
        manager: StreamableHTTPSessionManager = request.app.state.mcp
        await manager.handle_request(scope, receive, send)
