"""openapi.json: valid, served, complete, the real contract, and good enough to generate a
working client."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import re
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
from server.validation import ParameterValidator
from tests.live import serving
from tests.support import NOW, PIXEL, PROJECT, FakeGraph, funnel_parameters
from tools.catalog import OPENAPI_PATH
from tools.catalog import load_catalog as load_tools

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = json.loads(OPENAPI_PATH.read_text())
SCHEMAS = DOCUMENT["components"]["schemas"]
PUBLISHED = ROOT / "tests" / "data" / "actionkit_send_funnel_event.yaml"
SANDBOX_PATH = "/sandbox/events"
RUN_PATHS = {"/projects/{project_id}/tools": "tool", "/projects/{project_id}/actions": "action"}
MCP_PATH = "/projects/{project_id}/mcp"


def test_document_is_valid_openapi():
    validate(DOCUMENT)


def served_document(*, sandbox: bool) -> dict[str, Any]:
    """What the server should serve: openapi.json with each tool's parameters schema replaced
    by the one Run Tool validates (funnelgate's bounds included), and /sandbox/events only
    when the sandbox is on."""
    document = copy.deepcopy(DOCUMENT)
    schemas = document["components"]["schemas"]
    tools = load_tools()
    for tool, call in schemas["RunToolRequest"]["discriminator"]["mapping"].items():
        parameters = schemas[call.rsplit("/", 1)[-1]]["properties"]["parameters"]["$ref"]
        schemas[parameters.rsplit("/", 1)[-1]] = tools[tool].schema
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
    assert [code for code in sorted(documented) if f"`{code}`" not in readme] == []


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
    # 504: a Graph timeout (UpstreamUnavailable's status then); 429 and 503: the limits on calls.
    expected = {200} | error_statuses | {429, 503, 504}
    for path in RUN_PATHS:
        assert {int(s) for s in _responses(path, "post")} == expected, path


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
            for status in ("429", "503", "504"):
                if status in responses:
                    assert _header(responses[status], "Retry-After")["required"] is True
            if "401" in responses:
                assert _header(responses["401"], "WWW-Authenticate")["required"] is True


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
