"""MCP's `tools/call` names its tool in the request log, as Run Tool does (README, Logs)."""

from __future__ import annotations

import json
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.support import NOW, PIXEL, PROJECT

TOOL = "meta_send_conversion_event"


def test_tools_call_logs_the_tool_name(client, graph, sign, log_capture):
    arguments = {"pixel_id": PIXEL, "event_name": "Lead", "event_time": int(NOW),
                 "action_source": "chat", "user_data": {"external_id": "u-1"},
                 "response_format": "json"}  # fmt: skip

    async def call() -> Any:
        # In the app's own loop, where its lifespan (and the MCP session manager) runs.
        http = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=client.app),
            base_url="http://funnelgate.test",
            headers={"Authorization": f"Bearer {sign()}"},
        )
        async with (
            http,
            Client(streamable_http_client(f"http://funnelgate.test/projects/{PROJECT}/mcp",
                                          http_client=http)) as mcp,
        ):  # fmt: skip
            return await mcp.call_tool(TOOL, arguments)

    assert client.portal is not None
    result = client.portal.call(call)
    assert not result.is_error, result.content
    assert json.loads(result.content[0].text)["events_received"] == 1
    assert len(graph.received) == 1
    requests = [line for line in log_capture.lines(client) if line["event"] == "request"]
    assert [line["tool"] for line in requests if line["status"] == 200].count(TOOL) == 1
