"""The MCP endpoint with the official `mcp` client over real HTTP on loopback, delivering to
the fake Graph on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from server.app import create_app
from tests.live import serving
from tests.support import PIXEL, PROJECT, make_config
from tests.support import WallClockGraph as FakeGraphServer

OTHER_PROJECT = "project-without-token"


@pytest.fixture
def graph() -> Iterator[FakeGraphServer]:
    fake = FakeGraphServer()
    with serving(fake.app(), lifespan="off") as base_url:
        fake.base_url = base_url
        yield fake


@pytest.fixture
def mcp_base(tmp_path: Path, rsa_key, graph: FakeGraphServer) -> Iterator[str]:
    config = make_config(tmp_path, rsa_key, facebook_access_token="EAAB-mcp")
    second = dataclasses.replace(
        config.projects[PROJECT], id=OTHER_PROJECT, facebook_access_token=None
    )
    config = dataclasses.replace(
        config,
        graph=dataclasses.replace(config.graph, base_url=graph.base_url),
        projects={**config.projects, OTHER_PROJECT: second},
    )
    with serving(create_app(config)) as base_url:
        yield base_url


async def with_client(url: str, token: str, use) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        return await use(client)


def conversion_arguments(**overrides: Any) -> dict[str, Any]:
    arguments = {
        "pixel_id": PIXEL, "event_name": "Lead", "event_time": int(time.time()) - 5,
        "action_source": "chat", "user_data": {"em": "Ada@Example.com", "external_id": "u-1"},
        "response_format": "json",
    }  # fmt: skip
    return {**arguments, **overrides}


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


def test_call_tool_answers_markdown_by_default(mcp_base, sign):
    arguments = conversion_arguments()
    del arguments["response_format"]

    async def use(client):
        return await client.call_tool("meta_send_conversion_event", arguments)

    result = anyio.run(with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use)
    assert result.content[0].text.startswith("**Meta received 1 event(s)**")


def test_validation_and_graph_errors_are_is_error_results_with_the_same_code(mcp_base, graph, sign):
    graph.script.append({"status": 400, "error": {"message": "Invalid parameter", "code": 100}})

    async def use(client):
        invalid = await client.call_tool(
            "meta_send_conversion_event", conversion_arguments(pixel_id="abc")
        )
        rejected = await client.call_tool("meta_send_conversion_event", conversion_arguments())
        unknown = await client.call_tool("NO_SUCH_TOOL", {})
        return invalid, rejected, unknown

    invalid, rejected, unknown = anyio.run(
        with_client, f"{mcp_base}/projects/{PROJECT}/mcp", sign(), use
    )
    assert invalid.is_error and json.loads(invalid.content[0].text)["code"] == "INVALID_PARAMETERS"
    assert rejected.is_error and json.loads(rejected.content[0].text)["code"] == "UPSTREAM_REJECTED"
    assert unknown.is_error and json.loads(unknown.content[0].text)["code"] == "UNKNOWN_TOOL"
    assert len(graph.received) == 1


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
