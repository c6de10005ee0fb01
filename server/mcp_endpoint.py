"""The MCP endpoint: `/projects/{project_id}/mcp`, Streamable HTTP, official `mcp` SDK.

`tools/list` mirrors List Tools; `tools/call` goes through the same Runner as Run Tool, and
its failures come back as `isError` results carrying the same `message` and `code`. The same
Bearer JWT authenticates every HTTP request. Stateless, JSON responses: nothing is kept
between requests, so any worker can answer any request.
"""

from __future__ import annotations

from typing import Any

import mcp_types as types
import orjson
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from server.access import authenticate
from server.errors import FunnelgateError, IntegrationNotEnabled
from server.responses import error_response
from server.runner import Runner
from tools.base import JsonAnswer

SETUP_HINT = (
    "This user has no Meta access token in funnelgate. An administrator can add one with "
    "`funnelgate credentials set --project P --user U --access-token-file F`, or set the "
    "project's facebook_access_token."
)


def _caller(ctx: ServerRequestContext[Any, Any]) -> tuple[Runner, Any, str]:
    request = ctx.request
    assert isinstance(request, Request), "funnelgate serves MCP over HTTP only"
    state = request.state
    return request.app.state.runner, state.project_obj, state.user_id


async def _list_tools(
    ctx: ServerRequestContext[Any, Any], _params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    runner, _project, _user = _caller(ctx)
    return types.ListToolsResult(
        tools=[
            types.Tool(
                name=e.tool.name, description=e.tool.description, input_schema=dict(e.schema)
            )
            for e in runner.catalog.values()
        ]
    )


async def _call_tool(
    ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    runner, project, user_id = _caller(ctx)
    ctx.request.state.tool = params.name  # type: ignore[union-attr]  # for the request log
    try:
        answer = await runner.run(project, user_id, params.name, params.arguments or {})
    except FunnelgateError as exc:
        content: list[types.ContentBlock] = [
            types.TextContent(text=orjson.dumps(exc.body()).decode())
        ]
        if isinstance(exc, IntegrationNotEnabled):
            content.append(types.TextContent(text=SETUP_HINT))
        return types.CallToolResult(content=content, is_error=True)
    text = orjson.dumps(answer.body).decode() if isinstance(answer, JsonAnswer) else answer.text
    return types.CallToolResult(content=[types.TextContent(text=text)])


def session_manager() -> StreamableHTTPSessionManager:
    """A fresh manager; its `run()` belongs in the app's lifespan (it can run once only)."""
    server = Server(
        "funnelgate", version="0.1.0", on_list_tools=_list_tools, on_call_tool=_call_tool
    )
    return StreamableHTTPSessionManager(app=server, stateless=True, json_response=True)


class McpEndpoint:
    """ASGI app for the MCP route: authenticates, then hands over to the session manager.

    A class instance, not a function: Starlette routes a plain function as a GET-only
    request/response endpoint.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            project, user_id = authenticate(request)
        except FunnelgateError as exc:
            request.state.error_code = exc.code
            await error_response(exc)(scope, receive, send)
            return
        request.state.project_obj = project
        request.state.user_id = user_id
        manager: StreamableHTTPSessionManager = request.app.state.mcp
        await manager.handle_request(scope, receive, send)
