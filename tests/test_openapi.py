"""openapi.json: valid, served, complete, the real contract, and good enough to generate a
working client."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import random
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from starlette.testclient import TestClient

from server import errors
from server.app import create_app
from server.errors import InvalidParameters
from server.storage import outbox
from server.validation import ParameterValidator, shape_violation
from tests.live import serving
from tests.support import NOW, PIXEL, PROJECT, FakeGraph, Step, funnel_parameters, graph_error
from tools.catalog import OPENAPI_PATH, load_openapi, served_openapi
from tools.catalog import load_catalog as load_tools
from tools.limits import MAX_ANY_STRING, MAX_DEPTH, MAX_ITEMS

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = json.loads(OPENAPI_PATH.read_text())
SCHEMAS = DOCUMENT["components"]["schemas"]
PUBLISHED = ROOT / "tests" / "data" / "actionkit_send_funnel_event.yaml"
SANDBOX_PATH = "/sandbox/events"
RUN_PATHS = {"/projects/{project_id}/tools": "tool", "/projects/{project_id}/actions": "action"}
MCP_PATH = "/projects/{project_id}/mcp"
STATUS_PATH = "/projects/{project_id}/events/{event_id}"
CREDENTIAL_HEADER = {"$ref": "#/components/parameters/X-Paragon-Credential"}
MULTI_ACCOUNT = "https://docs.useparagon.com/apis/api-reference/multi-account-authorization"
JWT_PERMISSIONS = "https://docs.useparagon.com/apis/api-reference/jwt-permissions"


def test_document_is_valid_openapi():
    validate(DOCUMENT)


def served_document(*, sandbox: bool) -> dict[str, Any]:
    """What the server should serve: openapi.json with each tool's parameters schema replaced
    by the one Run Tool validates (funnelgate's bounds included), its `$defs` (free-form
    values) as components, and /sandbox/events only when the sandbox is on."""
    document = copy.deepcopy(DOCUMENT)
    schemas = document["components"]["schemas"]
    tools = load_tools()
    for tool, call in schemas["RunToolRequest"]["discriminator"]["mapping"].items():
        parameters = schemas[call.rsplit("/", 1)[-1]]["properties"]["parameters"]["$ref"]
        text = json.dumps(tools[tool].schema).replace('"#/$defs/', '"#/components/schemas/')
        schema = json.loads(text)
        for name, definition in schema.pop("$defs").items():
            assert schemas.setdefault(name, definition) == definition  # one meaning per name
        schemas[parameters.rsplit("/", 1)[-1]] = schema
    if not sandbox:
        del document["paths"][SANDBOX_PATH]
    return dict(document)


def test_served_document_states_the_validated_schemas_when_the_sandbox_is_on(config):
    sandboxed = dataclasses.replace(config, graph=dataclasses.replace(config.graph, sandbox=True))
    with TestClient(create_app(sandboxed)) as client:
        served = client.get("/openapi.json").json()
    validate(served)
    assert served == served_document(sandbox=True)


def test_served_document_omits_the_sandbox_route_when_the_sandbox_is_off(client):
    """A production server does not serve /sandbox/events, so its document does not list it."""
    served = client.get("/openapi.json").json()
    assert SANDBOX_PATH not in served["paths"]
    assert served == served_document(sandbox=False)


def test_every_route_is_documented(client):
    served = {
        (route.path, method.lower())
        for route in client.app.routes
        for method in (getattr(route, "methods", None) or {"POST"}) - {"HEAD"}
    }
    documented = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    assert served <= documented


def test_every_error_code_is_documented_in_openapi_and_readme():
    codes = set(
        re.findall(
            r'code\s*=\s*"([A-Z_]+)"',
            "".join(p.read_text() for p in (ROOT / "server").rglob("*.py")),
        )
    )
    documented = set(SCHEMAS["Error"]["properties"]["code"]["enum"])
    readme = (ROOT / "README.md").read_text()
    assert codes and codes <= documented, codes - documented
    # A queued event fails with these codes, plus EVENT_EXPIRED (no HTTP answer carries it).
    event_codes = SCHEMAS["EventError"]["properties"]["code"]["enum"]
    assert event_codes == [*SCHEMAS["Error"]["properties"]["code"]["enum"], "EVENT_EXPIRED"]
    # The README's table names every code a caller or a queued event can meet.
    met = codes | {"EVENT_EXPIRED"}
    assert [code for code in sorted(met) if f"`{code}`" not in readme] == []


def test_every_code_a_response_names_is_a_documented_code():
    """A description that names a code (CREDENTIAL_NOT_FOUND, say) names one a client can
    match on: a typo in either place fails here."""
    documented = set(SCHEMAS["Error"]["properties"]["code"]["enum"])
    responses = [*DOCUMENT["components"]["responses"].values()] + [
        response
        for item in DOCUMENT["paths"].values()
        for operation in item.values()
        for response in operation["responses"].values()
    ]
    named = {
        code
        for response in responses
        for code in re.findall(r"\b[A-Z]+(?:_[A-Z]+)+\b", response.get("description", ""))
    }
    assert {"CREDENTIAL_NOT_FOUND", "INTEGRATION_FORBIDDEN", "CREDENTIAL_FORBIDDEN"} <= named
    assert named <= documented, named - documented


def test_the_published_funnel_event_schema_is_kept_verbatim():
    published = yaml.safe_load(PUBLISHED.read_text())
    [(path, item)] = published["paths"].items()
    assert path == "/projects/{project_id}/tools/#FACEBOOK_ADS_SEND_FUNNEL_EVENT"
    body = item["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert SCHEMAS["FACEBOOK_ADS_SEND_FUNNEL_EVENT"] == body["properties"]["parameters"]


# The request bodies: one schema per tool, `tool` (or `action`) tied to its parameters.


def _validator(name: str) -> Draft202012Validator:
    """A validator for components.schemas[name], its $refs resolved inside the document."""
    return Draft202012Validator({**DOCUMENT, "$ref": f"#/components/schemas/{name}"})


SAMPLE_PARAMETERS = {
    "FACEBOOK_ADS_SEND_FUNNEL_EVENT": funnel_parameters(value=12.5, currency="EUR"),
    "FACEBOOK_ADS_SEND_LEAD_EVENT": {"pixel": PIXEL, "actionSource": "email",
                                     "customerEmail": "ada@example.com", "optOut": False},
    "meta_send_conversion_event": {"pixel_id": PIXEL, "event_name": "Purchase",
                                   "event_time": int(NOW), "action_source": "email",
                                   "user_data": {"em": "ada@example.com"}},
    "FACEBOOK_ADS_SEND_EVENTS": {"pixel_id": PIXEL, "events": [
        {"event_name": "Lead", "event_time": int(NOW), "action_source": "email",
         "user_data": {"em": "ada@example.com"}}]},
}  # fmt: skip


def _variants(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """Valid parameters, and ways to break them that a schema can see."""
    required_gone = {k: v for k, v in parameters.items() if k not in ("pixel", "pixel_id")}
    return [parameters, {**parameters, "customerEmial": "typo"}, required_gone,
            {**parameters, "pixel" if "pixel" in parameters else "pixel_id": 12}]  # fmt: skip


@pytest.mark.parametrize("path", RUN_PATHS)
def test_each_tool_name_decides_the_schema_of_its_parameters(path):
    key = RUN_PATHS[path]
    body_schema = DOCUMENT["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    name = body_schema["schema"]["$ref"].rsplit("/", 1)[-1]
    union = SCHEMAS[name]
    branches = {}
    for branch in union["oneOf"]:
        branch_schema = SCHEMAS[branch["$ref"].rsplit("/", 1)[-1]]
        assert branch_schema["required"] == [key, "parameters"]
        branches[branch_schema["properties"][key]["const"]] = branch["$ref"]
    tools = load_tools()
    assert branches == union["discriminator"]["mapping"] and set(branches) == set(tools)
    assert union["discriminator"]["propertyName"] == key

    request = _validator(name)
    for tool_name, parameters in SAMPLE_PARAMETERS.items():
        server = ParameterValidator(tool_name, tools[tool_name].schema)
        for variant in _variants(parameters):
            try:
                server.check(variant)
                server_accepts = True
            except InvalidParameters:
                server_accepts = False
            # The document accepts exactly the parameters the server's schema accepts...
            assert request.is_valid({key: tool_name, "parameters": variant}) == server_accepts
        # ...and only under their own tool's name.
        for other in set(tools) - {tool_name}:
            assert not request.is_valid({key: other, "parameters": parameters}), (tool_name, other)


# Free-form values (extra keys of custom_data and contents[] items, app_data): the served
# document states the bounds the server keeps on every value, at every depth.
FREE_FORM_SITES = {
    "FACEBOOK_ADS_SEND_FUNNEL_EVENT": ["contents[0]"],
    "FACEBOOK_ADS_SEND_LEAD_EVENT": ["contents[0]"],
    "meta_send_conversion_event": ["custom_data", "custom_data.contents[0]", "app_data"],
    "FACEBOOK_ADS_SEND_EVENTS": ["events[0].custom_data", "events[0].custom_data.contents[0]",
                                 "events[0].app_data"],
}  # fmt: skip


def _with_free_value(tool: str, site: str, value: Any) -> tuple[dict[str, Any], int]:
    """The tool's sample parameters with `value` under key "x" of the object at `site`,
    and the depth of that value as server/validation.py counts it (parameters at 0)."""
    parameters = copy.deepcopy(SAMPLE_PARAMETERS[tool])
    node: Any = parameters
    depth = 1
    for part in site.split("."):
        name, _, index = part.partition("[")
        node = node.setdefault(name, [] if index else {})
        depth += 1
        if index:
            if not node:
                node.append({"id": "A", "quantity": 1})
            node = node[int(index.rstrip("]"))]
            depth += 1
    node["x"] = value
    return parameters, depth


def _nested(levels: int, leaf: Any = "x") -> Any:
    """`levels` containers (objects and arrays in turn) around `leaf`."""
    for level in range(levels):
        leaf = {"k": leaf} if level % 2 else [leaf]
    return leaf


def _free_values(depth: int) -> list[tuple[Any, bool]]:
    """Values either side of every bound, for a value at `depth`, each with its verdict."""
    room = MAX_DEPTH - depth  # containers that still fit around a scalar
    return [
        (None, True), (True, True), (0.5, True), (-1e300, False), (2**53, True),
        (2**64 - 1, True), (2**64, False), (2**70, False),
        # -(2**63) - 1 reaches the server over HTTP as the float -(2**63): both are refused.
        (-(2**63) + 1, True), (-(2**63), False), (-(2**63) - 1, False), (-(2**70), False),
        ("s" * MAX_ANY_STRING, True), ("s" * (MAX_ANY_STRING + 1), False),
        ([0] * MAX_ITEMS, True), ([0] * (MAX_ITEMS + 1), False),
        ({f"k{i}": i for i in range(100)}, True), ({f"k{i}": i for i in range(101)}, False),
        (_nested(room), True), (_nested(room - 1, {"k": 2**64}), False),
        (_nested(room - 1, ["s" * (MAX_ANY_STRING + 1)]), False),
        (_nested(room - 1, {f"k{i}": i for i in range(101)}), False),
        ({"k": [None, {"k": [-(2**70)]}]}, False),
    ]  # fmt: skip


def _random_json(rng: random.Random, depth: int) -> Any:
    """A JSON value within MAX_DEPTH, integers of any size included."""
    kind = rng.choice("nbifsao" if depth < MAX_DEPTH else "nbifs")
    if kind == "n":
        return None
    if kind == "b":
        return rng.random() < 0.5
    if kind == "i":
        return rng.choice([1, -1]) * rng.getrandbits(rng.choice([8, 53, 63, 64, 65, 90]))
    if kind == "f":
        return rng.uniform(-1, 1) * 10 ** rng.randint(0, 25)
    if kind == "s":
        return "s" * rng.choice([0, 3, MAX_ANY_STRING, MAX_ANY_STRING + 1])
    size = rng.randint(0, 3)
    if kind == "a":
        return [_random_json(rng, depth + 1) for _ in range(size)]
    return {f"k{i}": _random_json(rng, depth + 1) for i in range(size)}


def _accepts(validator: ParameterValidator, parameters: Any) -> bool:
    try:
        validator.check(parameters)
    except InvalidParameters:
        return False
    return True


@pytest.mark.parametrize(("tool", "site"), [(t, s) for t, sites in FREE_FORM_SITES.items()
                                            for s in sites])  # fmt: skip
def test_the_served_document_bounds_free_form_values_as_the_server_does(tool, site):
    """What the served document accepts the server accepts, and both refuse the same values:
    server/validation.py's bounds on every value, at any depth. The nesting bound is the one
    the document states in words only (AnyBoundedJson's description)."""
    document = served_openapi(load_openapi(), load_tools(), sandbox=False)
    request = Draft202012Validator({**document, "$ref": "#/components/schemas/RunToolRequest"})
    server = ParameterValidator(tool, load_tools()[tool].schema)
    _, depth = _with_free_value(tool, site, None)
    for value, expected in _free_values(depth):
        parameters, _ = _with_free_value(tool, site, value)
        served = request.is_valid({"tool": tool, "parameters": parameters})
        assert (served, _accepts(server, parameters)) == (expected, expected), str(value)[:200]
    rng = random.Random(f"{tool} {site}")
    verdicts = []
    for _ in range(300):
        parameters, _ = _with_free_value(tool, site, value := _random_json(rng, depth))
        served = request.is_valid({"tool": tool, "parameters": parameters})
        assert served == _accepts(server, parameters), str(value)[:200]
        verdicts.append(served)
    assert min(verdicts.count(True), verdicts.count(False)) >= 30  # both outcomes, often
    # Deeper than MAX_DEPTH: the server refuses what the document's schema lets through.
    too_deep, _ = _with_free_value(tool, site, _nested(MAX_DEPTH - depth + 1))
    assert request.is_valid({"tool": tool, "parameters": too_deep})
    violation = shape_violation(too_deep)
    assert violation is not None and violation.message == f"nests deeper than {MAX_DEPTH} levels"
    described = document["components"]["schemas"]["AnyBoundedJson"]["description"]
    assert f"nested at most {MAX_DEPTH} levels deep" in described


def test_no_schema_enumerates_booleans():
    """`enum: [true]` breaks openapi-generator; a boolean constant is `const`."""

    def walk(node: Any, where: str) -> Iterator[str]:
        if isinstance(node, dict):
            if any(isinstance(v, bool) for v in node.get("enum", [])):
                yield where
            for key, value in node.items():
                yield from walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, f"{where}/{index}")

    assert list(walk(DOCUMENT, "#")) == []


# Responses: every status the server answers, with the headers each promises.


def _responses(path: str, method: str) -> dict[str, Any]:
    resolved = {}
    for status, response in DOCUMENT["paths"][path][method]["responses"].items():
        name = response.get("$ref", "").rsplit("/", 1)[-1]
        resolved[status] = DOCUMENT["components"]["responses"][name] if name else response
    return resolved


def _header(response: dict[str, Any], name: str) -> dict[str, Any]:
    header = response.get("headers", {}).get(name, {})
    if "$ref" in header:
        header = DOCUMENT["components"]["headers"][header["$ref"].rsplit("/", 1)[-1]]
    return dict(header)


def test_run_tool_documents_every_status_the_server_can_answer():
    error_statuses = {
        cls.status for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.FunnelgateError)
    }  # fmt: skip
    # 429 and 503: the limits on calls; 202: queued (also when Meta is unavailable, so no 504);
    # 409 and 422: Idempotency-Key's in progress and reused; 403: the token's JWT permissions.
    expected = {200, 202} | error_statuses | {403, 409, 422, 429, 503}
    for path in RUN_PATHS:
        responses = _responses(path, "post")
        assert {int(s) for s in responses} == expected, path
        # Meta being unavailable is a 202: a 502 is only ever a refused credential.
        assert re.findall(r"UPSTREAM_[A-Z]+", responses["502"]["description"]) == ["UPSTREAM_AUTH"]
        assert "Retry-After" not in responses["502"].get("headers", {})
        assert "meta_unavailable" in responses["202"]["description"]


def test_mcp_documents_the_streamable_http_statuses():
    assert set(_responses(MCP_PATH, "post")) == {
        "200", "202", "400", "401", "404", "405", "406", "413", "415", "429", "500", "503"}  # fmt: skip


def test_every_operation_documents_method_not_allowed_and_internal_errors():
    for path, item in DOCUMENT["paths"].items():
        for method in item:
            responses = _responses(path, method)
            assert {"405", "500"} <= set(responses), (path, method)
            assert _header(responses["405"], "Allow")["required"] is True


def test_retryable_and_unauthorized_answers_document_their_headers():
    for path, item in DOCUMENT["paths"].items():
        for method in item:
            responses = _responses(path, method)
            for status in ("409", "429", "503"):
                if status in responses:
                    assert _header(responses[status], "Retry-After")["required"] is True
            if "401" in responses:
                assert _header(responses["401"], "WWW-Authenticate")["required"] is True


# Durable delivery: Prefer, Idempotency-Key, the 202 and the status of a queued event.


def _parameter(parameter: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in parameter:
        return dict(DOCUMENT["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[-1]])
    return parameter


def _json_schema(response: dict[str, Any]) -> dict[str, Any]:
    return dict(response["content"]["application/json"]["schema"])


def _is_valid(name: str, instance: Any) -> bool:
    """Against components.schemas[name], formats (date-time) checked too."""
    schema = {**DOCUMENT, "$ref": f"#/components/schemas/{name}"}
    return Draft202012Validator(
        schema, format_checker=Draft202012Validator.FORMAT_CHECKER
    ).is_valid(instance)


@pytest.mark.parametrize("path", RUN_PATHS)
def test_run_tool_takes_prefer_an_idempotency_key_and_a_credential(path):
    parameters = [_parameter(p) for p in DOCUMENT["paths"][path]["post"]["parameters"]]
    headers = {p["name"]: p for p in parameters if p["in"] == "header"}
    assert set(headers) == {"Prefer", "Idempotency-Key", "X-Paragon-Credential"}
    assert not any(p["required"] for p in headers.values())
    # Unknown preferences are ignored (RFC 7240 §2), so no value of Prefer may be refused.
    assert headers["Prefer"]["schema"] == {"type": "string"}


@pytest.mark.parametrize("path", RUN_PATHS)
def test_run_tool_documents_the_queued_answer_and_idempotency(path):
    responses = _responses(path, "post")
    accepted = responses["202"]
    assert _json_schema(accepted) == {"$ref": "#/components/schemas/Queued"}
    assert _header(accepted, "Location")["required"] is True
    assert not _header(accepted, "Preference-Applied").get("required")  # only when Prefer asked
    assert "Preference-Applied" in responses["200"]["headers"]
    # The answers a key replays: 200, 202 and Meta's 400.
    for status in ("200", "202", "400"):
        assert _header(responses[status], "Idempotent-Replayed")["schema"] == {
            "type": "string",
            "const": "true",
        }
    assert "IDEMPOTENCY_IN_PROGRESS" in responses["409"]["description"]
    assert "IDEMPOTENCY_KEY_REUSED" in responses["422"]["description"]
    for status in ("409", "422"):
        assert _json_schema(responses[status]) == {"$ref": "#/components/schemas/Error"}
    assert {"QUEUE_FULL", "OVERLOADED", "STORAGE_UNAVAILABLE"} <= set(
        re.findall(r"[A-Z_]{6,}", responses["503"]["description"])
    )


KEY_SCHEMA = _parameter({"$ref": "#/components/parameters/Idempotency-Key"})["schema"]
GOOD_KEYS = ['"8e03978e-40d5-43e8-bc93-6894a57f9324"', "order-1001", '"a"', "~",
             '"' + "k" * 255 + '"', "k" * 255, r'"a\"b"', r'"a\\b"', '"a,b"']  # fmt: skip
BAD_KEYS = ['""', "", '"' + "k" * 256 + '"', "k" * 256, '"a b"', "a,b", '"abc', '"a"b"',
            r'"a\qb"', 'a"b', "a\\b", "é", '"é"', '"a"x']  # fmt: skip


@pytest.mark.parametrize("key", GOOD_KEYS + BAD_KEYS)
def test_the_idempotency_key_format(key):
    """An RFC 8941 String of 1 to 255 visible ASCII characters, or the same characters bare."""
    assert Draft202012Validator(KEY_SCHEMA).is_valid(key) == (key in GOOD_KEYS)


def test_the_idempotency_key_format_is_the_one_the_server_parses():
    idempotency = pytest.importorskip("server.idempotency")
    for key in GOOD_KEYS + BAD_KEYS:
        try:
            accepted = idempotency.parse_key([key]) is not None
        except errors.BadRequest:
            accepted = False
        assert accepted == (key in GOOD_KEYS), key


# Multi Account Authorization and JWT permissions: X-Paragon-Credential, the 403, and the
# credential a dry run and an event status show.

CREDENTIAL_OPERATIONS = [(path, method) for path in RUN_PATHS for method in ("post", "get")] + [
    (MCP_PATH, "post")
]


def test_the_credential_header_is_declared_where_a_credential_is_used():
    """Run Tool, List Tools (both paths) and MCP pick a credential; nothing else does."""
    declared = {
        (path, method)
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        if CREDENTIAL_HEADER in operation.get("parameters", [])
    }
    assert declared == set(CREDENTIAL_OPERATIONS)
    for path, method in CREDENTIAL_OPERATIONS:
        parameters = DOCUMENT["paths"][path][method]["parameters"]
        assert parameters.count(CREDENTIAL_HEADER) == 1, (path, method)
    header = _parameter(CREDENTIAL_HEADER)
    assert (header["name"], header["in"], header["required"]) == (
        "X-Paragon-Credential",
        "header",
        False,
    )
    assert header["schema"] == {"type": "string", "minLength": 1, "maxLength": 200}
    examples = [example["value"] for example in header["examples"].values()]
    assert any(value.startswith("ext:") for value in examples)
    assert all(Draft202012Validator(header["schema"]).is_valid(value) for value in examples)
    # ActionKit's own wording, its page, both ways to name a credential, and the fallbacks.
    for words in ('"via X-Paragon-Credential header"', MULTI_ACCOUNT, "Credential ID",
                  "`ext:<External ID>`", "default credential", "project-wide token",
                  "CREDENTIAL_NOT_FOUND", "INVALID_REQUEST", "CREDENTIAL_FORBIDDEN"):  # fmt: skip
        assert words in header["description"], words


@pytest.mark.parametrize(
    ("value", "valid"),
    [("3f1c2a9e-7b4d-4e8a-9c61-0d5e2f8a7b13", True), ("ext:ada@example.com", True),
     ("x", True), ("x" * 200, True), ("", False), ("x" * 201, False), (None, False)],
)  # fmt: skip
def test_the_credential_header_format(value, valid):
    schema = _parameter(CREDENTIAL_HEADER)["schema"]
    assert Draft202012Validator(schema).is_valid(value) == valid


@pytest.mark.parametrize("path", RUN_PATHS)
def test_run_tool_documents_the_403_of_jwt_permissions(path):
    responses = _responses(path, "post")
    forbidden = responses["403"]
    assert DOCUMENT["paths"][path]["post"]["responses"]["403"] == {
        "$ref": "#/components/responses/Forbidden"
    }
    assert _json_schema(forbidden) == {"$ref": "#/components/schemas/Error"}
    codes = set(re.findall(r"[A-Z_]{6,}", forbidden["description"]))
    assert {"INTEGRATION_FORBIDDEN", "CREDENTIAL_FORBIDDEN"} <= codes
    for words in ("`urn:useparagon:connect:permissions`", JWT_PERMISSIONS, "`integration:*`",
                  "`integration:facebookAds`", "`credential:*`", "`credential:<Credential ID>`",
                  "dry runs too", "nothing was sent"):  # fmt: skip
        assert words in forbidden["description"], words
    assert "CREDENTIAL_NOT_FOUND" in responses["400"]["description"]


def test_list_tools_and_mcp_never_answer_403():
    """List Tools hides what the token may not use; MCP answers a refused tools/call as an
    isError result. Both name the codes a client can meet instead."""
    for path in RUN_PATHS:
        responses = _responses(path, "get")
        assert "403" not in responses
        assert "CREDENTIAL_NOT_FOUND" in responses["400"]["description"]
        assert "JWT permissions" in DOCUMENT["paths"][path]["get"]["description"]
    assert "403" not in _responses(MCP_PATH, "post")
    described = DOCUMENT["paths"][MCP_PATH]["post"]["description"]
    for words in ("X-Paragon-Credential", "isError", "CREDENTIAL_NOT_FOUND",
                  "INTEGRATION_FORBIDDEN", "CREDENTIAL_FORBIDDEN"):  # fmt: skip
        assert words in described, words


CREDENTIALS = [
    None,
    {"id": "3f1c2a9e-7b4d-4e8a-9c61-0d5e2f8a7b13", "label": "Agency BM", "source": "header",
     "status": "valid"},
    {"id": "3f1c2a9e-7b4d-4e8a-9c61-0d5e2f8a7b13", "label": None, "source": "default",
     "status": "invalid"},
    {"id": None, "label": None, "source": "project", "status": "valid"},
]  # fmt: skip


def test_the_dry_run_shows_the_credential_it_would_use(client, sign):
    """The current dry-run answer validates, with `credential` absent and in each shape."""
    response = client.post(
        f"/projects/{PROJECT}/tools",
        params={"dry_run": "true"},
        headers={"Authorization": f"Bearer {sign()}"},
        json={"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": funnel_parameters()},
    )
    assert response.status_code == 200, response.text
    body = {k: v for k, v in response.json().items() if k != "credential"}
    assert _is_valid("DryRun", body)
    for credential in CREDENTIALS:
        assert _is_valid("DryRun", {**body, "credential": credential}), credential
    shown = CREDENTIALS[1]
    assert shown is not None
    for broken in ({**shown, "source": "env"}, {**shown, "status": "removed"},
                   {**shown, "id": 7}, {k: v for k, v in shown.items() if k != "label"},
                   "3f1c2a9e-7b4d-4e8a-9c61-0d5e2f8a7b13"):  # fmt: skip
        assert not _is_valid("DryRun", {**body, "credential": broken}), broken


def test_an_event_status_shows_its_credential(tmp_path):
    held = _statuses(tmp_path)["held"]
    credential = {"id": "3f1c2a9e-7b4d-4e8a-9c61-0d5e2f8a7b13", "status": "invalid"}
    for status in ("valid", "invalid", "removed"):
        assert _is_valid("EventStatus", {**held, "credential": {**credential, "status": status}})
    for broken in ({**credential, "status": "expired"}, {**credential, "id": None},
                   {"status": "valid"}, None):  # fmt: skip
        assert not _is_valid("EventStatus", {**held, "credential": broken}), broken
    assert "credential" not in SCHEMAS["EventStatus"]["required"]  # absent: the project token


# The 202 body of issue 10's contract.
QUEUED = {"status": "queued", "event_ids": ["order-1001", "order-1002"], "events_received": 2,
          "status_url": f"/projects/{PROJECT}/events/order-1001"}  # fmt: skip


def test_the_queued_body_validates():
    assert _is_valid("Queued", QUEUED)
    assert _is_valid("Queued", {**QUEUED, "reason": "meta_unavailable",
                                "warnings": [{"path": "parameters.customerPhone",
                                              "message": "has no country code"}]})  # fmt: skip
    unavailable = {"code": "UPSTREAM_UNAVAILABLE", "message": "Graph answered 503.",
                   "upstream": {"http_status": 503, "attempts": 2}}  # fmt: skip
    assert _is_valid("Queued", {**QUEUED, "reason": "meta_unavailable", "upstream": unavailable})
    assert not _is_valid("Queued", {**QUEUED, "upstream": {**unavailable, "code": "MYSTERY"}})
    for broken in ({**QUEUED, "status": "accepted"}, {**QUEUED, "event_ids": []},
                   {**QUEUED, "event_ids": [1001]}, {**QUEUED, "events_received": "2"},
                   {k: v for k, v in QUEUED.items() if k != "status_url"}):  # fmt: skip
        assert not _is_valid("Queued", broken), broken


@pytest.mark.parametrize(
    ("answers", "status", "schema"),
    [([graph_error(400, 17)], 202, "Queued"),  # throttled
     ([Step(503, content=b"<html>busy</html>")] * 50, 202, "Queued"),
     ([Step(delay=1.0)] * 20, 202, "Queued"),  # timeouts
     ([graph_error(400, 190)], 502, "Error")],
)  # fmt: skip
def test_meta_being_unavailable_answers_the_documented_202(make_client, graph, sign, answers,
                                                            status, schema):  # fmt: skip
    """In sync mode, Meta's 5xx, timeouts and throttling queue the events (202, Queued with
    `upstream` when Meta answered); only a refused credential is a 502."""
    client = make_client(graph_settings={"timeout_seconds": 0.05},
                         delivery_settings={"sync_budget_seconds": 0.4})  # fmt: skip
    graph.script.extend(answers)
    response = client.post(f"/projects/{PROJECT}/tools", headers={"Authorization": f"Bearer {sign()}"},
                           json={"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
                                 "parameters": funnel_parameters()})  # fmt: skip
    assert response.status_code == status, response.text
    assert _is_valid(schema, response.json()), response.text
    if status == 202:
        assert response.json()["reason"] == "meta_unavailable"
    else:
        assert response.json()["code"] == "UPSTREAM_AUTH"


def test_the_status_route_is_documented():
    operation = DOCUMENT["paths"][STATUS_PATH]["get"]
    assert operation["security"] == [{"BearerAuth": []}]
    assert [(p["name"], p["in"], p["required"]) for p in operation["parameters"]] == [
        ("project_id", "path", True),
        ("event_id", "path", True),
    ]
    responses = _responses(STATUS_PATH, "get")
    assert set(responses) == {"200", "401", "404", "405", "500", "503"}
    assert _json_schema(responses["200"]) == {"$ref": "#/components/schemas/EventStatus"}
    assert "NOT_FOUND" in responses["404"]["description"]
    # What a client must know: only queued events have a status; what `held` means.
    assert "not recorded" in operation["description"]
    assert "funnelgate credentials set" in operation["description"]


EVENT = {"event_id": "order-1001", "event_name": "Purchase", "pixel_id": PIXEL,
         "event_time": int(NOW), "action_source": "website"}  # fmt: skip
UPSTREAM = {"message": "Invalid parameter", "type": "OAuthException", "code": 100,
            "error_subcode": 2804003, "fbtrace_id": "A1b2C3", "http_status": 400, "attempts": 1}  # fmt: skip


def _statuses(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """outbox.EventStatus.public() of an event in each state, from a real outbox table."""
    db = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    try:
        outbox.create_schema(db)
        names = ("queued", "retrying", "held", "delivered", "rejected", "expired")
        rows = [outbox.NewEvent(PROJECT, "user-1", None, PIXEL, None, {**EVENT, "event_id": name}, b"{}")
                for name in names]  # fmt: skip
        seq = dict(
            zip(names, outbox.insert(db, outbox.rows_of(rows, now=NOW, next_at=NOW)), strict=True)
        )
        later = NOW + 5
        rejected = {
            "code": "UPSTREAM_REJECTED",
            "message": "Meta refused it.",
            "upstream": UPSTREAM,
        }
        unavailable = {"code": "UPSTREAM_UNAVAILABLE", "message": "Graph answered 503."}
        refused = {"code": "UPSTREAM_AUTH", "message": "Meta refused the access token.",
                   "upstream": {**UPSTREAM, "code": 190, "error_subcode": 463}}  # fmt: skip
        expired = {"code": "EVENT_EXPIRED", "message": "Older than Meta accepts."}
        outbox.reschedule(db, [(seq["retrying"], later + 30)], now=later, error=unavailable)
        outbox.mark_held(db, [seq["held"]], now=later, error=refused)
        outbox.mark_delivered(db, [seq["delivered"]], now=later, fbtrace_id="AbCdEf")
        outbox.mark_failed(db, [seq["rejected"]], now=later, error=rejected)
        outbox.mark_failed(db, [seq["expired"]], now=later, error=expired, attempted=False)
        found = {name: outbox.event_status(db, PROJECT, "user-1", name) for name in names}
    finally:
        db.close()
    return {name: status.public() for name, status in found.items() if status is not None}


def test_the_status_of_an_event_in_every_state_validates(tmp_path):
    statuses = _statuses(tmp_path)
    assert {name: body["status"] for name, body in statuses.items()} == {
        "queued": "queued", "retrying": "queued", "held": "queued",
        "delivered": "delivered", "rejected": "failed", "expired": "failed"}  # fmt: skip
    properties = set(SCHEMAS["EventStatus"]["properties"])
    for name, body in statuses.items():
        assert _is_valid("EventStatus", body), (name, body)
        assert set(body) <= properties, (name, set(body) - properties)
    assert statuses["held"]["held"] is True
    assert "next_attempt_at" in statuses["retrying"]
    assert statuses["rejected"]["error"]["upstream"]["code"] == 100


def test_the_status_schema_refuses_what_a_client_cannot_parse(tmp_path):
    body = _statuses(tmp_path)["rejected"]
    for broken in ({**body, "status": "held"}, {**body, "attempts": "1"},
                   {**body, "updated_at": "yesterday"},
                   {**body, "error": {**body["error"], "code": "MYSTERY"}},
                   {k: v for k, v in body.items() if k != "accepted_at"}):  # fmt: skip
        assert not _is_valid("EventStatus", broken), broken


def test_every_example_of_a_json_answer_validates():
    """The document's own examples (202, event statuses) are answers a client can parse."""
    checked = 0
    for item in DOCUMENT["paths"].values():
        for operation in item.values():
            for response in operation["responses"].values():
                media = response.get("content", {}).get("application/json", {})
                for example in media.get("examples", {}).values():
                    validator = Draft202012Validator(
                        {**DOCUMENT, **media["schema"]},
                        format_checker=Draft202012Validator.FORMAT_CHECKER,
                    )
                    assert validator.is_valid(example["value"]), example["summary"]
                    checked += 1
    assert checked >= 3


# meta_send_conversion_event over HTTP: JSON unless asked for markdown (openapi.json's 200).


def _conversion_call(client: TestClient, sign, accept: str | None, **parameters: Any):
    headers = {"Authorization": f"Bearer {sign()}"}
    if accept is not None:
        headers["Accept"] = accept
    parameters = {**SAMPLE_PARAMETERS["meta_send_conversion_event"], **parameters}
    body = {"tool": "meta_send_conversion_event", "parameters": parameters}
    client.headers.pop("accept", None)  # the test client's own default is */*
    return client.post(f"/projects/{PROJECT}/tools", json=body, headers=headers)


@pytest.mark.parametrize(
    ("accept", "response_format", "expected"),
    [
        (None, None, "application/json"),
        ("*/*", None, "application/json"),
        ("application/json", None, "application/json"),
        ("application/json, text/markdown", None, "application/json"),
        ("text/markdown", None, "text/markdown"),
        ("text/*", None, "text/markdown"),
        ("text/markdown, application/json;q=0.5", None, "text/markdown"),
        ("application/json;q=0.2, text/*;q=0.1, text/markdown;q=0.9", None, "text/markdown"),
        ("text/plain", None, "application/json"),
        ("text/markdown", "json", "application/json"),
        ("application/json", "markdown", "text/markdown"),
    ],
)  # fmt: skip
def test_the_conversion_event_answers_the_media_type_openapi_documents(
    client, sign, accept, response_format, expected
):
    extra = {"response_format": response_format} if response_format else {}
    response = _conversion_call(client, sign, accept, **extra)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == expected
    documented = DOCUMENT["paths"]["/projects/{project_id}/tools"]["post"]["responses"]["200"]
    assert expected in documented["content"]


# A client generated from openapi.json.


@pytest.fixture(scope="module")
def fgclient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModuleType]]:
    out = tmp_path_factory.mktemp("generated")
    subprocess.run(
        [str(Path(sys.executable).parent / "openapi-python-client"), "generate", "--path", str(OPENAPI_PATH),
         "--meta", "none", "--output-path", str(out / "fgclient")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    sys.path.insert(0, str(out))
    try:
        yield {
            "client": importlib.import_module("fgclient"),
            "run_tool": importlib.import_module("fgclient.api.default.run_tool"),
            "models": importlib.import_module("fgclient.models"),
        }
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == "fgclient" or m.startswith("fgclient.")]:
            del sys.modules[name]


def _generated_call(fgclient, config, sign, model: str, tool: str, parameters: dict[str, Any]):
    graph = FakeGraph()
    app = create_app(config, graph_transport=graph.transport(), clock=lambda: NOW)
    with serving(app) as base_url:
        body = getattr(fgclient["models"], model).from_dict(
            {"tool": tool, "parameters": parameters}
        )
        with fgclient["client"].AuthenticatedClient(base_url=base_url, token=sign()) as client:
            return fgclient["run_tool"].sync_detailed(PROJECT, client=client, body=body), graph


def test_a_generated_client_runs_a_tool(fgclient, config, sign):
    response, graph = _generated_call(fgclient, config, sign, "FunnelEventToolCall",
                                      "FACEBOOK_ADS_SEND_FUNNEL_EVENT", funnel_parameters())  # fmt: skip
    assert response.status_code == 200
    assert response.parsed.events_received == 1
    assert graph.bodies()[0]["data"][0]["event_id"] == "order-1001"


def test_a_generated_client_gets_json_from_the_conversion_event_tool(fgclient, config, sign):
    """No response_format: a client generated from openapi.json parses the answer."""
    response, graph = _generated_call(fgclient, config, sign, "ConversionEventToolCall",
                                      "meta_send_conversion_event",
                                      SAMPLE_PARAMETERS["meta_send_conversion_event"])  # fmt: skip
    assert response.status_code == 200, response.content
    assert response.parsed.events_received == 1
    assert graph.bodies()[0]["data"][0]["event_name"] == "Purchase"


def test_a_generated_client_parses_the_queued_answer_and_every_event_status(fgclient, tmp_path):
    models = fgclient["models"]
    queued = models.Queued.from_dict(QUEUED)
    assert (queued.event_ids, queued.status_url) == (QUEUED["event_ids"], QUEUED["status_url"])
    for name, body in _statuses(tmp_path).items():
        status = models.EventStatus.from_dict(body)
        assert (status.event_id, str(status.status)) == (name, body["status"])
        assert status.accepted_at.isoformat() == body["accepted_at"].replace("Z", "+00:00")
        if "error" in body:
            assert str(status.error.code) == body["error"]["code"]
    run_tool = inspect.signature(fgclient["run_tool"].sync_detailed).parameters
    assert {"prefer", "idempotency_key", "x_paragon_credential"} <= set(run_tool)
    status_call = importlib.import_module("fgclient.api.default.get_event_status")
    assert list(inspect.signature(status_call.sync_detailed).parameters)[:2] == [
        "project_id",
        "event_id",
    ]


def test_a_generated_client_sends_the_credential_header_and_parses_the_credentials(
    fgclient, tmp_path
):
    list_tools = importlib.import_module("fgclient.api.default.list_tools")
    assert "x_paragon_credential" in inspect.signature(list_tools.sync_detailed).parameters
    credential = {"id": "3f1c2a9e-7b4d-4e8a-9c61-0d5e2f8a7b13", "status": "invalid"}
    body = {**_statuses(tmp_path)["held"], "credential": credential}
    status = fgclient["models"].EventStatus.from_dict(body)
    assert (status.credential.id, str(status.credential.status)) == (credential["id"], "invalid")
    shown = fgclient["models"].DryRunCredential.from_dict(CREDENTIALS[3])
    assert (shown.id, shown.label, str(shown.source)) == (None, None, "project")
