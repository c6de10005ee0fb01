"""HTTP endpoints: turn requests into plain data for the runner and answers back into JSON."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from server.access import authenticate
from server.bodies import read_json_body
from server.errors import BadRequest, NotFound
from server.idempotency import Idempotency, derived_ids, fingerprint, parse_key
from server.listing import FORMATS, as_function, as_paragon
from server.logs import clip
from server.responses import json_response
from server.runner import Access, Preferences, Queued, Runner, status_path
from server.sandbox import SandboxGraph
from server.storage import outbox
from server.storage.credentials import MAX_SELECTOR
from tools.base import FACEBOOK_ADS, JsonAnswer
from tools.limits import MAX_ANY_STRING

MAX_WAIT_SECONDS = 3600  # a `Prefer: wait` beyond this is read as this


async def _run(request: Request, name_key: str) -> Response:
    project, user_id, permissions = authenticate(request)
    prefer, keys, selectors = _headers_of_note(request.scope["headers"])
    key = parse_key(keys)
    selector = _selector(selectors)
    access = Access(selector, permissions)
    body = await read_json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="INVALID_REQUEST")
    other_key = "action" if name_key == "tool" else "tool"
    tool_name = body.get(name_key, body.get(other_key))
    if not isinstance(tool_name, str) or not tool_name:
        raise BadRequest(f"The request body needs a '{name_key}' string.", code="INVALID_REQUEST")
    request.state.tool = clip(tool_name)  # caller text, capped before it reaches a log
    if "parameters" not in body:
        raise BadRequest("The request body needs a 'parameters' object.", code="INVALID_REQUEST")
    runner: Runner = request.app.state.runner
    parameters = body["parameters"]
    if _flag(request, "dry_run", default=False):
        # Nothing is sent, so nothing is kept; with a key it shows the ids the call will use.
        new_id = None
        if key is not None:
            fp = fingerprint(tool_name, parameters, selector)
            new_id = derived_ids(project.id, user_id, key, fp)
        return json_response(
            await runner.dry_run(
                project, user_id, tool_name, parameters, new_id=new_id, access=access
            )
        )
    sent = parameters  # the request's identity: as sent, before the Accept-driven default
    preferences = _preferences(prefer)
    if (
        isinstance(parameters, dict)
        and "response_format" not in parameters
        and tool_name in runner.catalog
        and "response_format" in runner.catalog[tool_name].schema.get("properties", {})
    ):
        # Over HTTP the answer is JSON unless the caller asks for markdown: a client generated
        # from openapi.json cannot parse text (MCP keeps its markdown default: README, Tools).
        fmt = "markdown" if _prefers_markdown(request.headers.get("accept", "")) else "json"
        parameters = {**parameters, "response_format": fmt}

    async def call(new_id: Callable[[], str] | None) -> Response:
        answer = await runner.run(
            project, user_id, tool_name, parameters,
            prefer=preferences, new_id=new_id, access=access,
        )  # fmt: skip
        if isinstance(answer, Queued):
            return _accepted(project.id, answer, preferences)
        applied = _applied(preferences, queued=False)
        if isinstance(answer, JsonAnswer):
            request.state.fbtrace_id = answer.body.get("fbtrace_id")
            return json_response(answer.body, headers=applied)
        return Response(answer.text, media_type=answer.media_type, headers=applied)

    if key is None:
        return await call(None)
    if tool_name in runner.catalog:  # a replay answers only what this token may use
        await runner.authorize(project, user_id, tool_name, access)
    idempotency: Idempotency = request.app.state.idempotency
    return await idempotency.handle(
        project.id, user_id, key,
        tool_name=tool_name, parameters=sent, call=call, credential=selector,
    )  # fmt: skip


def _accepted(project_id: str, queued: Queued, prefer: Preferences) -> Response:
    """202: on disk, to be delivered; Location names the first event's status."""
    headers = _applied(prefer, queued=True) or {}
    if queued.event_ids:
        headers["Location"] = status_path(project_id, queued.event_ids[0])
    return json_response(queued.body(project_id), status=202, headers=headers)


def _headers_of_note(
    headers: list[tuple[bytes, bytes]],
) -> tuple[list[str], list[str], list[str]]:
    """`Prefer`, `Idempotency-Key` and `X-Paragon-Credential` field lines, in one pass over
    the raw headers (this runs on every call; starlette's getlist would scan them once per
    name)."""
    prefer: list[str] = []
    keys: list[str] = []
    selectors: list[str] = []
    for name, value in headers:
        if name == b"prefer":
            prefer.append(value.decode("latin-1"))
        elif name == b"idempotency-key":
            keys.append(value.decode("latin-1"))
        elif name == b"x-paragon-credential":
            selectors.append(value.decode("latin-1"))
    return prefer, keys, selectors


def _selector(values: list[str]) -> str | None:
    """The credential `X-Paragon-Credential` names: a credential id, or `ext:` and an
    external id (https://docs.useparagon.com/apis/api-reference/multi-account-authorization)."""
    if not values:
        return None
    value = values[0].strip()
    if len(values) > 1 or not value or len(value) > MAX_SELECTOR:
        raise BadRequest(
            f"X-Paragon-Credential must be one credential id or ext:<external id>, at most "
            f"{MAX_SELECTOR} characters.",
            code="INVALID_REQUEST",
        )
    return value


def selector_of(request: Request) -> str | None:
    """The credential the request names (List Tools, MCP)."""
    return _selector(request.headers.getlist("x-paragon-credential"))


def _preferences(values: list[str]) -> Preferences:
    """RFC 7240 §2: `Prefer` is a list of preferences, possibly over several header lines;
    a preference not understood is ignored, as is a malformed one."""
    if not values:
        return Preferences()
    respond_async = False
    wait: float | None = None
    for item in ",".join(values)[:1024].split(","):
        name, _, value = item.split(";", 1)[0].strip().partition("=")
        name = name.strip().lower()
        if name == "respond-async":
            respond_async = True
        elif name == "wait" and value.strip().strip('"').isdigit():
            wait = float(min(int(value.strip().strip('"')), MAX_WAIT_SECONDS))
    return Preferences(respond_async=respond_async, wait=wait)


def _applied(prefer: Preferences, *, queued: bool) -> dict[str, str] | None:
    """Preference-Applied (RFC 7240 §3): what this answer honoured."""
    applied = []
    if prefer.respond_async and queued:
        applied.append("respond-async")
    if prefer.wait is not None and not prefer.respond_async:
        applied.append(f"wait={int(prefer.wait)}")
    return {"Preference-Applied": ", ".join(applied)} if applied else None


async def event_status(request: Request) -> Response:
    """GET /projects/{id}/events/{event_id}: a queued event's state, for its own user only."""
    project, user_id, permissions = authenticate(request)
    event_id = request.path_params["event_id"]
    found = None
    # No longer id was ever accepted (tools/limits.py), nor one with a NUL (server/bodies.py).
    if len(event_id) <= MAX_ANY_STRING and "\x00" not in event_id:
        found = await request.app.state.outbox.read(
            lambda db: outbox.event_status(db, project.id, user_id, event_id)
        )
    if found is None:
        raise NotFound("No queued event with this event_id for this user.", code="NOT_FOUND")
    runner: Runner = request.app.state.runner
    body = found.public(await runner.credential_status(project.id, found.credential_id))
    if not permissions.may_use_credential(FACEBOOK_ADS.name, found.credential_id):
        body.pop("credential", None)  # a credential the token may not see
    return json_response(body)


def _prefers_markdown(accept: str) -> bool:
    """Whether `Accept` ranks text/markdown above application/json: each gets the q of the
    most specific range that matches it (RFC 9110 §12.5.1); no Accept, */* and ties: JSON."""
    return _quality(accept, "text/markdown") > _quality(accept, "application/json")


def _quality(accept: str, media_type: str) -> float:
    ranks = {media_type: 3, media_type.split("/", 1)[0] + "/*": 2, "*/*": 1}
    best_rank, best_q = 0, 0.0
    for media_range in accept.split(",")[:32]:
        media, *params = (part.strip() for part in media_range.split(";"))
        rank = ranks.get(media.lower(), 0)
        if rank > best_rank:
            best_rank, best_q = rank, _q_value(params)
    return best_q


def _q_value(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value)
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


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
    project, user_id, permissions = authenticate(request)
    access = Access(selector_of(request), permissions)
    fmt = request.query_params.get("format", "json_schema")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of: {', '.join(FORMATS)}.", code="INVALID_REQUEST")
    describe = as_function if fmt == "json_schema" else as_paragon
    integrations, categories = _csv(request, "integrations"), _csv(request, "categories")
    runner: Runner = request.app.state.runner
    if access.selector is not None:  # a credential named is one of the user's, or a 400
        await runner.named(project, user_id, access.selector)
    grouped: dict[str, list[dict[str, Any]]] = {}
    limit = _flag(request, "limit_to_available", default=True)
    shown: dict[str, bool] = {}  # per integration: what the token may use (and has, with limit)
    for entry in runner.catalog.values():
        integration = entry.tool.integration
        if integrations and integration.name not in integrations:
            continue
        if categories and not categories & set(integration.categories):
            continue
        if integration.name not in shown:
            shown[integration.name] = (
                await runner.available(project, user_id, integration.name, access)
                if limit
                else permissions.may_use_integration(integration.name)
            )
        if shown[integration.name]:
            grouped.setdefault(integration.name, []).append(describe(entry))
    return json_response({**{key: grouped for key in keys}, "errors": []})


async def list_tools(request: Request) -> Response:
    """Answers under both `tools` and `actions`: ActionKit's docs disagree on the key, and
    clients written against either must keep working."""
    return await _list(request, ("tools", "actions"))


async def list_actions(request: Request) -> Response:
    return await _list(request, ("actions",))


def sandbox_events(sandbox: SandboxGraph) -> Callable[[Request], Awaitable[Response]]:
    """GET /sandbox/events: what the sandbox Graph accepted, access tokens redacted."""

    async def endpoint(_: Request) -> Response:
        return json_response({"requests": list(sandbox.accepted)})

    endpoint.__name__ = "sandbox_events"  # in the request log and the metrics
    return endpoint


async def openapi(request: Request) -> Response:
    return Response(request.app.state.openapi_bytes, media_type="application/json")


async def run_tool(request: Request) -> Response:
    return await _run(request, "tool")


async def run_action(request: Request) -> Response:
    """The legacy ActionKit path: `action` instead of `tool`, identical otherwise."""
    return await _run(request, "action")


async def healthz(_: Request) -> Response:
    return json_response({"status": "ok"})
