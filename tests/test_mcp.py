"""The MCP endpoint with the official `mcp` client over real HTTP on loopback, delivering to
the fake Graph on 127.0.0.1.

The client speaks two eras, and the SDK serves them on different paths: `mode="auto"` takes
the 2026-07-28 per-request envelope, `mode="legacy"` the initialize handshake (2025-11-25).
Tests that depend on the path run on both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from server import logs
from server.app import create_app
from server.delivery.transport import Answer
from tests.live import serving
from tests.support import PIXEL, PROJECT, TRACE_ID, funnel_parameters, make_config
from tests.support import WallClockGraph as FakeGraphServer
from tools.catalog import inline_refs, load_openapi

OTHER_PROJECT = "project-without-token"
LOG_PROJECT = "project-for-log-tests"  # the log is process-wide: its lines name the project
QUEUED_PROJECT = "project-in-queued-mode"
MODES = ["auto", "legacy"]
EMAIL = "ada.lovelace@example.com"


@pytest.fixture(scope="module")
def graph_server() -> Iterator[FakeGraphServer]:
    fake = FakeGraphServer()
    with serving(fake.app(), lifespan="off") as base_url:
        fake.base_url = base_url
        yield fake


@pytest.fixture
def graph(graph_server: FakeGraphServer) -> FakeGraphServer:
    graph_server.reset()
    return graph_server


def mcp_config(tmp_path: Path, rsa_key, graph_url: str):
    config = make_config(tmp_path, rsa_key, facebook_access_token="EAAB-mcp")
    first = config.projects[PROJECT]
    second = dataclasses.replace(first, id=OTHER_PROJECT, facebook_access_token=None)
    logged = dataclasses.replace(first, id=LOG_PROJECT)
    queued = dataclasses.replace(first, id=QUEUED_PROJECT, delivery_mode="queued")
    return dataclasses.replace(
        config,
        graph=dataclasses.replace(config.graph, base_url=graph_url),
        projects={
            **config.projects,
            OTHER_PROJECT: second,
            LOG_PROJECT: logged,
            QUEUED_PROJECT: queued,
        },
    )


@pytest.fixture(scope="module")
def mcp_server(tmp_path_factory, rsa_key, graph_server: FakeGraphServer) -> Iterator[str]:
    """One server for the module (stopping one takes ~0.3 s); tests share nothing else."""
    config = mcp_config(tmp_path_factory.mktemp("mcp"), rsa_key, graph_server.base_url)
    with serving(create_app(config)) as base_url:
        yield base_url


@pytest.fixture
def mcp_base(mcp_server: str, graph: FakeGraphServer) -> str:
    return mcp_server


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure(out)
    yield out
    logs._sink.stream = None  # back to silent, as for every other test


def request_lines(
    out: io.StringIO, count: int, *, tools_only: bool = False
) -> list[dict[str, Any]]:
    """LOG_PROJECT's request log lines (those naming a tool, if asked), once `count` are there:
    the server logs after answering, so the client can be done first (the wait is bounded)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        found = [
            x
            for x in lines
            if x["event"] == "request"
            and x["project"] == LOG_PROJECT
            and (x["tool"] or not tools_only)
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


async def with_client(url: str, token: str, use, mode: str = "auto") -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        return await use(client)


def conversion_arguments(**overrides: Any) -> dict[str, Any]:
    arguments = {
        "pixel_id": PIXEL, "event_name": "Lead", "event_time": int(time.time()) - 5,
        "action_source": "chat", "user_data": {"em": "Ada@Example.com", "external_id": "u-1"},
        "response_format": "json",
    }  # fmt: skip
    return {**arguments, **overrides}


def live_funnel_parameters(**overrides: Any) -> dict[str, Any]:
    """A funnel event timed now (conftest's is timed for the fixed test clock)."""
    return funnel_parameters(eventTime=None, **overrides)


def raw_headers(token: str, version: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": version,
    }


def envelope(version: str) -> str:
    """The `_meta` a 2026-07-28 request must carry; nothing for the handshake era."""
    if version != "2026-07-28":
        return ""
    meta = {
        "io.modelcontextprotocol/protocolVersion": version,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return f', "_meta": {json.dumps(meta)}'


VERSIONS = ["2025-06-18", "2026-07-28"]


def raw_tools_call(tool: str, arguments_json: str, version: str) -> bytes:
    """A `tools/call` as bytes, arguments spliced in verbatim (for literals json can't write)."""
    return (
        f'{{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": '
        f'{{"name": {json.dumps(tool)}, "arguments": {arguments_json}{envelope(version)}}}}}'
    ).encode()


def sdk_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the SDK logged at ERROR: a handler exception there is a traceback on stderr."""
    return [r for r in caplog.records if r.name.startswith("mcp") and r.levelno >= logging.ERROR]


def test_tools_list_mirrors_list_tools(mcp_base, sign):
    async def use(client):
        return (await client.list_tools()).tools

    tools = anyio.run(with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use)
    listed = httpx2.get(
        f"{mcp_base}/projects/{PROJECT}/tools", headers={"Authorization": f"Bearer {sign()}"}
    )
    functions = [f["function"] for f in listed.json()["tools"]["facebookAds"]]
    assert [(t.name, t.description, t.input_schema) for t in tools] == [
        (f["name"], f["description"], f["parameters"]) for f in functions
    ]


@pytest.mark.parametrize("mode", MODES)
def test_every_tool_has_a_title_annotations_and_an_output_schema_for_json(mcp_base, sign, mode):
    async def use(client):
        return (await client.list_tools()).tools

    tools = anyio.run(with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use, mode)
    schemas = load_openapi()["components"]["schemas"]
    events_received = inline_refs(schemas["EventsReceived"], schemas)
    assert "$ref" not in json.dumps(events_received)  # a client resolves nothing outside it
    assert {t.name: t.title for t in tools} == {
        "FACEBOOK_ADS_SEND_FUNNEL_EVENT": "Send Funnel Event",
        "FACEBOOK_ADS_SEND_LEAD_EVENT": "Send Lead Event",
        "meta_send_conversion_event": "Send Conversion Event (CAPI)",
        "FACEBOOK_ADS_SEND_EVENTS": "Send Events (Batch)",
    }
    for tool in tools:
        hints = tool.annotations
        assert hints is not None
        assert (hints.read_only_hint, hints.destructive_hint) == (False, False)
        assert (hints.idempotent_hint, hints.open_world_hint) == (False, True)
        # meta_send_conversion_event answers markdown unless asked for JSON: no schema to promise
        expected = None if tool.name == "meta_send_conversion_event" else events_received
        assert tool.output_schema == expected, tool.name


@pytest.mark.parametrize("mode", MODES)
def test_an_answer_with_warnings_passes_the_clients_output_schema_check(
    mcp_base, graph, sign, mode
):
    """The official client checks every result against the tool's outputSchema."""

    async def use(client):
        return await client.call_tool(
            "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
            live_funnel_parameters(customerCountryCode=None, customerPhone="(650) 555-1212"),
        )

    result = anyio.run(with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use, mode)
    assert not result.is_error
    [warning] = result.structured_content["warnings"]
    assert warning["path"] == "parameters.customerPhone"


@pytest.mark.parametrize("mode", MODES)
def test_json_results_carry_structured_content_and_the_same_text(mcp_base, graph, sign, mode):
    async def use(client):
        funnel = await client.call_tool("FACEBOOK_ADS_SEND_FUNNEL_EVENT", live_funnel_parameters())
        conversion = await client.call_tool("meta_send_conversion_event", conversion_arguments())
        markdown_arguments = conversion_arguments()
        del markdown_arguments["response_format"]
        markdown = await client.call_tool("meta_send_conversion_event", markdown_arguments)
        return funnel, conversion, markdown

    # The client itself checks structured content against the tool's outputSchema.
    funnel, conversion, markdown = anyio.run(
        with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use, mode
    )
    for result in (funnel, conversion):
        assert not result.is_error
        assert result.structured_content["events_received"] == 1
        assert json.loads(result.content[0].text) == result.structured_content
    assert markdown.structured_content is None
    assert markdown.content[0].text.startswith("**Meta received 1 event(s)**")
    assert len(graph.received) == 3


@pytest.mark.parametrize("mode", MODES)
def test_a_queued_answer_passes_the_clients_output_schema_check(mcp_base, graph, sign, mode):
    async def use(client):
        return await client.call_tool("FACEBOOK_ADS_SEND_FUNNEL_EVENT", live_funnel_parameters())

    result = anyio.run(with_client, f"{mcp_base}/projects/{QUEUED_PROJECT}/mcp", sign(), use, mode)
    assert not result.is_error
    answer = result.structured_content
    assert (answer["status"], answer["events_received"]) == ("queued", 1)
    assert answer["status_url"] == f"/projects/{QUEUED_PROJECT}/events/{answer['event_ids'][0]}"
    assert json.loads(result.content[0].text) == answer
    deadline = time.monotonic() + 5  # delivered before the next test looks at the fake Graph
    while not graph.received and time.monotonic() < deadline:
        time.sleep(0.01)
    [sent] = graph.bodies()
    assert sent["data"][0]["event_id"] == answer["event_ids"][0]


def test_call_tool_delivers_through_the_same_path_as_run_tool(mcp_base, graph, sign):
    async def use(client):
        return await client.call_tool("meta_send_conversion_event", conversion_arguments())

    result = anyio.run(with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use)
    assert not result.is_error
    assert json.loads(result.content[0].text)["events_received"] == 1
    [received] = graph.received
    body = received.json()
    assert body["access_token"] == "EAAB-mcp"
    assert body["data"][0]["user_data"] == {
        "em": [hashlib.sha256(b"ada@example.com").hexdigest()],
        "external_id": [hashlib.sha256(b"u-1").hexdigest()],
    }


@pytest.mark.parametrize("mode", MODES)
def test_validation_and_graph_errors_are_is_error_results_with_the_same_code(
    mcp_base, graph, sign, mode
):
    graph.script.append({"status": 400, "error": {"message": "Invalid parameter", "code": 100}})

    async def use(client):
        invalid = await client.call_tool(
            "meta_send_conversion_event", conversion_arguments(pixel_id="abc")
        )
        rejected = await client.call_tool("meta_send_conversion_event", conversion_arguments())
        return invalid, rejected

    invalid, rejected = anyio.run(
        with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use, mode
    )
    assert invalid.is_error and json.loads(invalid.content[0].text)["code"] == "INVALID_PARAMETERS"
    assert rejected.is_error and json.loads(rejected.content[0].text)["code"] == "UPSTREAM_REJECTED"
    assert invalid.structured_content is None
    assert len(graph.received) == 1


@pytest.mark.parametrize("mode", MODES)
def test_an_unknown_tool_is_a_json_rpc_invalid_params_error(mcp_base, graph, sign, mode):
    """MCP 2025-06-18, Tools, Error Handling: unknown tools are protocol errors (-32602)."""

    async def use(client):
        with pytest.raises(MCPError) as raised:
            await client.call_tool("NO_SUCH_TOOL", {})
        return raised.value

    error = anyio.run(with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use, mode)
    assert error.code == -32602
    assert error.message == "Unknown tool 'NO_SUCH_TOOL'."
    assert error.data["code"] == "UNKNOWN_TOOL"
    assert graph.received == []


def test_user_without_credential_gets_a_clear_result(mcp_base, graph, sign):
    async def use(client):
        return await client.call_tool("meta_send_conversion_event", conversion_arguments())

    result = anyio.run(with_client, f"{mcp_base}/projects/{OTHER_PROJECT}/mcp", sign(), use)
    assert result.is_error
    assert json.loads(result.content[0].text)["message"] == "Integration not enabled for user."
    assert "funnelgate credentials set" in result.content[1].text
    assert graph.received == []


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-jwt"}])
def test_every_mcp_request_needs_the_user_token(mcp_base, headers):
    response = httpx2.post(f"{mcp_base}/projects/{PROJECT}/mcp", headers=headers,
                           json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})  # fmt: skip
    assert (response.status_code, response.json()["code"]) == (401, "UNAUTHORIZED")
    unknown = httpx2.post(
        f"{mcp_base}/projects/nope/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    )
    assert unknown.json()["code"] == "UNKNOWN_PROJECT"


# --- Run Tool's body rules -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_call_over_1_mib_is_refused_with_413_and_the_official_client_says_why(
    mcp_base, graph, sign, mode
):
    async def use(client):
        with pytest.raises(MCPError) as raised:
            await client.call_tool(
                "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
                live_funnel_parameters(contentName="x" * (3 * 1024 * 1024)),
            )
        return raised.value

    error = anyio.run(with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use, mode)
    assert error.message == "The request body is larger than 1 MiB."
    assert error.data["code"] == "PAYLOAD_TOO_LARGE"
    assert graph.received == []


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_the_body_limit_is_counted_while_reading(mcp_base, graph, sign, declared):
    arguments = json.dumps(live_funnel_parameters(contentName="x" * (3 * 1024 * 1024)))
    body = raw_tools_call("FACEBOOK_ADS_SEND_FUNNEL_EVENT", arguments, "2025-06-18")

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = httpx2.post(
        f"{mcp_base}/projects/{PROJECT}/mcp",
        headers=raw_headers(sign(), "2025-06-18"),
        content=body if declared else chunks(),
        timeout=30,
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == -32600
    assert error["data"] == {
        "message": "The request body is larger than 1 MiB.",
        "code": "PAYLOAD_TOO_LARGE",
        "retryable": False,
    }
    assert graph.received == []


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_numbers_json_cannot_carry_are_a_parse_error_as_on_run_tool(
    mcp_base, graph, sign, caplog, version, literal
):
    arguments = (
        json.dumps(conversion_arguments())[:-1] + f', "custom_data": {{"value": {literal}}}}}'
    )
    response = httpx2.post(
        f"{mcp_base}/projects/{PROJECT}/mcp",
        headers=raw_headers(sign(), version),
        content=raw_tools_call("meta_send_conversion_event", arguments, version),
    )
    assert response.status_code == 400
    assert response.json() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": -32700,
            "message": "The request body is not valid JSON.",
            "data": {
                "message": "The request body is not valid JSON.",
                "code": "INVALID_JSON",
                "retryable": False,
            },
        },
    }
    assert graph.received == []
    assert sdk_errors(caplog) == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("number", [2**70, 2**64, -(2**63) - 1], ids=["2^70", "2^64", "-2^63-1"])
def test_an_integer_beyond_64_bits_is_a_clean_tool_error_naming_its_path(
    mcp_base, graph, sign, caplog, mode, number
):
    """Graph's serialiser writes 64-bit integers at most. custom_data's extra keys have no
    schema of their own, so nothing but this check stands between them and it."""
    event = {k: v for k, v in conversion_arguments().items() if k not in ("pixel_id", "response_format")}  # fmt: skip

    async def use(client):
        typed = await client.call_tool(
            "FACEBOOK_ADS_SEND_FUNNEL_EVENT", live_funnel_parameters(numItems=number)
        )
        free = await client.call_tool(
            "meta_send_conversion_event", conversion_arguments(custom_data={"points": number})
        )
        nested = await client.call_tool(
            "FACEBOOK_ADS_SEND_EVENTS",
            {"pixel_id": PIXEL, "events": [
                event, {**event, "custom_data": {"contents": [{"id": "a", "quantity": number}]}},
            ]},
        )  # fmt: skip
        widest = await client.call_tool(
            "meta_send_conversion_event", conversion_arguments(custom_data={"points": 2**64 - 1})
        )
        return typed, free, nested, widest

    typed, free, nested, widest = anyio.run(
        with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use, mode
    )
    paths = []
    for result in (typed, free, nested):
        assert result.is_error
        error = json.loads(result.content[0].text)
        assert error["code"] == "INVALID_PARAMETERS"
        [violation] = error["errors"]
        assert violation["message"] == "is out of range (at most 64 bits)"
        paths.append(violation["path"])
    assert paths == [
        "parameters.numItems",
        "parameters.custom_data.points",
        "parameters.events[1].custom_data.contents[0].quantity",
    ]
    assert not widest.is_error  # the widest integer that fits goes through, exactly
    assert [r.json()["data"][0]["custom_data"] for r in graph.received] == [{"points": 2**64 - 1}]
    assert sdk_errors(caplog) == []


# --- Nothing submitted comes back ------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "body",
    [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": EMAIL},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": [EMAIL]},
        {"jsonrpc": "2.0", "id": {"who": EMAIL}, "method": "tools/call", "params": {}},
        {"jsonrpc": EMAIL, "id": 1, "method": "tools/call"},
        [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": EMAIL}}],
    ],
    ids=["params-string", "params-list", "id-object", "jsonrpc-version", "batch"],
)
def test_a_malformed_message_is_refused_without_echoing_it(mcp_base, graph, sign, version, body):
    response = httpx2.post(
        f"{mcp_base}/projects/{PROJECT}/mcp",
        headers=raw_headers(sign(), version),
        content=json.dumps(body).encode(),
    )
    assert response.status_code == 400
    assert EMAIL not in response.text
    error = response.json()["error"]
    assert (error["code"], error["data"]["code"]) == (-32600, "INVALID_REQUEST")
    assert graph.received == []


@pytest.mark.parametrize("mode", MODES)
def test_invalid_arguments_are_named_by_path_never_by_value(mcp_base, graph, sign, mode):
    async def use(client):
        return await client.call_tool(
            "meta_send_conversion_event",
            conversion_arguments(
                pixel_id=EMAIL,
                event_name=[EMAIL],
                action_source=EMAIL,
                user_data={"em": {"address": EMAIL}},
            ),
        )

    result = anyio.run(with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use, mode)
    assert result.is_error
    text = result.content[0].text
    assert EMAIL not in text and "ada.lovelace" not in text
    paths = {e["path"] for e in json.loads(text)["errors"]}
    assert {"parameters.pixel_id", "parameters.event_name", "parameters.action_source"} <= paths
    assert graph.received == []


class ExplodingGraph:
    """Graph's transport failing in a way nothing expects: a stand-in for a bug below the
    tool handler. Its message carries customer data, which must not come back."""

    async def post(self, url: str, content: bytes) -> Answer:
        raise ValueError(f"unexpected failure for {EMAIL}")

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("mode", MODES)
def test_an_unexpected_failure_is_a_clean_tool_error_never_code_0(
    tmp_path, rsa_key, sign, caplog, log_stream, mode
):
    config = mcp_config(tmp_path, rsa_key, "http://127.0.0.1:9")
    with serving(create_app(config, graph_transport=ExplodingGraph())) as base_url:

        async def use(client):
            return await client.call_tool("meta_send_conversion_event", conversion_arguments())

        result = anyio.run(with_client, f"{base_url}/projects/{LOG_PROJECT}/mcp", sign(), use, mode)
    assert result.is_error
    assert json.loads(result.content[0].text) == {
        "message": "Internal error.",
        "code": "INTERNAL_ERROR",
        "retryable": False,
    }
    assert EMAIL not in result.content[0].text
    assert sdk_errors(caplog) == []
    [line] = request_lines(log_stream, 1, tools_only=True)
    assert line["code"] == "INTERNAL_ERROR"
    unhandled = [json.loads(x) for x in log_stream.getvalue().splitlines() if "unhandled" in x]
    assert [u["error"] for u in unhandled] == ["ValueError"]


# --- The request log -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_request_log_names_the_endpoint_the_tool_and_the_outcome(
    mcp_base, graph, sign, log_stream, mode
):
    async def use(client):
        await client.call_tool("meta_send_conversion_event", conversion_arguments())
        await client.call_tool("meta_send_conversion_event", conversion_arguments(pixel_id="x"))
        with pytest.raises(MCPError):
            await client.call_tool("NO_SUCH_" + "X" * 100_000, {})

    anyio.run(with_client, f"{mcp_base}/projects/{LOG_PROJECT}/mcp", sign(), use, mode)
    calls = request_lines(log_stream, 3, tools_only=True)
    assert {line["endpoint"] for line in request_lines(log_stream, 3)} == {"mcp"}
    assert [(line["tool"][:26], line["code"]) for line in calls] == [
        ("meta_send_conversion_event", None),
        ("meta_send_conversion_event", "INVALID_PARAMETERS"),
        ("NO_SUCH_XXXXXXXXXXXXXXXXXX", "UNKNOWN_TOOL"),
    ]
    assert calls[0]["fbtrace_id"] == TRACE_ID  # the fake Graph's answer, as Meta's would be
    assert len(calls[2]["tool"]) <= 300  # 256 and the "…(+N chars)" mark


def test_a_refused_body_is_logged_with_its_code(mcp_base, sign, log_stream):
    response = httpx2.post(
        f"{mcp_base}/projects/{LOG_PROJECT}/mcp",
        headers=raw_headers(sign(), "2025-06-18"),
        content=raw_tools_call("meta_send_conversion_event", '{"x": NaN}', "2025-06-18"),
    )
    assert response.status_code == 400
    [line] = request_lines(log_stream, 1)
    assert (line["endpoint"], line["status"], line["code"]) == ("mcp", 400, "INVALID_JSON")
