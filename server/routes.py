"""HTTP endpoints: turn requests into plain data for the runner and answers back into JSON."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from server.auth import bearer_token
from server.config import Project
from server.errors import BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType
from server.listing import FORMATS, as_function, as_paragon
from server.runner import Runner
from tools.catalog import CATEGORIES

MAX_BODY_BYTES = 1024 * 1024


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def project_of(request: Request) -> Project:
    project_id = request.path_params["project_id"]
    project: Project | None = request.app.state.config.projects.get(project_id)
    if project is None:
        raise NotFound("Unknown project.", code="UNKNOWN_PROJECT")
    request.state.project = project.id
    return project


def authenticate(request: Request) -> tuple[Project, str]:
    """The URL's project and the connected user (the verified token's `sub`)."""
    project = project_of(request)
    token = bearer_token(request.headers.get("authorization"))
    return project, request.app.state.tokens.verify(token, project)


async def read_json_body(request: Request) -> Any:
    """The parsed body: JSON only, at most 1 MiB (checked while reading, not just by header)."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise UnsupportedMediaType("Send the body as JSON with Content-Type: application/json.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge("The request body is larger than 1 MiB.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge("The request body is larger than 1 MiB.")
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None


async def _run(request: Request, name_key: str) -> Response:
    project, user_id = authenticate(request)
    body = await read_json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="INVALID_REQUEST")
    other_key = "action" if name_key == "tool" else "tool"
    tool_name = body.get(name_key, body.get(other_key))
    if not isinstance(tool_name, str) or not tool_name:
        raise BadRequest(f"The request body needs a '{name_key}' string.", code="INVALID_REQUEST")
    request.state.tool = tool_name
    if "parameters" not in body:
        raise BadRequest("The request body needs a 'parameters' object.", code="INVALID_REQUEST")
    runner: Runner = request.app.state.runner
    if _flag(request, "dry_run", default=False):
        return json_response(runner.dry_run(project, user_id, tool_name, body["parameters"]))
    answer = await runner.run(project, user_id, tool_name, body["parameters"])
    if isinstance(answer, str):  # a tool's human format, e.g. response_format=markdown
        return Response(answer, media_type="text/markdown; charset=utf-8")
    request.state.fbtrace_id = answer.get("fbtrace_id")
    return json_response(answer)


def _flag(request: Request, name: str, *, default: bool) -> bool:
    if not request.scope["query_string"]:
        return default  # the usual call: no query string to parse
    value = request.query_params.get(name)
    if value is None:
        return default
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise BadRequest(f"Query parameter {name} must be true or false.", code="INVALID_REQUEST")


def _csv(request: Request, name: str) -> set[str]:
    return {part.strip() for part in request.query_params.get(name, "").split(",") if part.strip()}


async def _list(request: Request, keys: tuple[str, ...]) -> Response:
    project, user_id = authenticate(request)
    fmt = request.query_params.get("format", "json_schema")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of: {', '.join(FORMATS)}.", code="INVALID_REQUEST")
    describe = as_function if fmt == "json_schema" else as_paragon
    integrations, categories = _csv(request, "integrations"), _csv(request, "categories")
    runner: Runner = request.app.state.runner
    available = runner.has_credential(project, user_id)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for tool in runner.tools.values():
        if integrations and tool.integration not in integrations:
            continue
        if categories and not categories & set(CATEGORIES.get(tool.integration, ())):
            continue
        if _flag(request, "limit_to_available", default=True) and not available:
            continue
        grouped.setdefault(tool.integration, []).append(describe(tool))
    return json_response({**{key: grouped for key in keys}, "errors": []})


async def list_tools(request: Request) -> Response:
    """Answers under both `tools` and `actions`: ActionKit's docs disagree on the key, and
    clients written against either must keep working."""
    return await _list(request, ("tools", "actions"))


async def list_actions(request: Request) -> Response:
    return await _list(request, ("actions",))


async def openapi(request: Request) -> Response:
    return Response(request.app.state.openapi_bytes, media_type="application/json")


async def run_tool(request: Request) -> Response:
    return await _run(request, "tool")


async def run_action(request: Request) -> Response:
    """The legacy ActionKit path: `action` instead of `tool`, identical otherwise."""
    return await _run(request, "action")


async def healthz(_: Request) -> Response:
    return json_response({"status": "ok"})
