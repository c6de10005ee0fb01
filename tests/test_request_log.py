"""The request log line: X-Request-ID accepted (plain, at most 128 chars) or generated, echoed,
and on every line of its request; the level follows the status; caller text is capped."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from server import logs
from tests.support import PROJECT, TRACE_ID, funnel_parameters, graph_error

URL = f"/projects/{PROJECT}/tools"
TOOL = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure(out)
    yield out
    logs.flush()
    logs._sink.stream = None  # back to silent, as for every other test


def logged(out: io.StringIO) -> list[dict[str, Any]]:
    assert logs.flush()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_plain_request_id_is_echoed_and_on_every_line_of_the_request(client, sign, log_stream):
    response = client.post(URL, json={"tool": TOOL, "parameters": funnel_parameters()},
                           headers={"Authorization": f"Bearer {sign()}", "X-Request-ID": "req-42"})  # fmt: skip
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-42"
    lines = logged(log_stream)
    assert {line["event"] for line in lines} >= {"graph_attempt", "request"}
    assert all(line["request_id"] == "req-42" for line in lines)


@pytest.mark.parametrize("sent", [None, "joe@example.com", "x" * 129, "two words"])
def test_any_other_request_id_is_replaced_by_a_new_one(client, log_stream, sent):
    headers = {"X-Request-ID": sent} if sent is not None else {}
    response = client.get("/healthz", headers=headers)
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    [line] = logged(log_stream)
    assert line["request_id"] == request_id
    assert sent is None or sent not in log_stream.getvalue()


def test_requests_do_not_share_a_request_id(client, log_stream):
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3
    assert {line["request_id"] for line in logged(log_stream)} == ids


def test_the_request_line_level_follows_the_status(client, graph, sign, log_stream):
    auth = {"Authorization": f"Bearer {sign()}"}
    assert client.get("/healthz").status_code == 200
    assert client.post(URL, json={"tool": TOOL, "parameters": {}}).status_code == 401
    graph.script.append(graph_error(400, 190))
    response = client.post(
        URL, json={"tool": TOOL, "parameters": funnel_parameters()}, headers=auth
    )
    assert response.status_code == 502
    levels = [
        (line["status"], line["level"]) for line in logged(log_stream) if line["event"] == "request"
    ]
    assert levels == [(200, "info"), (401, "info"), (502, "error")]


def test_a_huge_tool_name_makes_a_short_line(client, sign, log_stream):
    response = client.post(URL, json={"tool": "x" * 900_000, "parameters": {}},
                           headers={"Authorization": f"Bearer {sign()}"})  # fmt: skip
    assert response.status_code == 404
    [line] = [line for line in logged(log_stream) if line["event"] == "request"]
    assert line["tool"].startswith("x" * 200) and line["tool"].endswith("chars)")
    assert max(len(raw) for raw in log_stream.getvalue().splitlines()) < 1000


FIELDS = ("method", "endpoint", "project", "tool", "status", "code", "fbtrace_id")


def requests_logged(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: line[k] for k in FIELDS} for line in lines if line["event"] == "request"]


def test_each_request_logs_its_outcome_and_error_code(client, sign, log_capture):
    headers = {"Authorization": f"Bearer {sign()}"}
    body = {"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": funnel_parameters()}
    assert client.post(URL, json=body, headers=headers).status_code == 200
    body["parameters"] = funnel_parameters(customerEmail="joe-at-example")
    assert client.post(URL, json=body, headers=headers).status_code == 400
    assert client.post(URL, json=body).status_code == 401
    assert client.get("/nowhere").status_code == 404

    lines = log_capture.lines(client)
    run = {"method": "POST", "endpoint": "run_tool", "project": PROJECT}
    assert requests_logged(lines) == [
        {**run, "tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "status": 200, "code": None,
         "fbtrace_id": TRACE_ID},
        {**run, "tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "status": 400,
         "code": "INVALID_PARAMETERS", "fbtrace_id": None},
        {**run, "tool": None, "status": 401, "code": "UNAUTHORIZED", "fbtrace_id": None},
        {"method": "GET", "endpoint": None, "project": None, "tool": None, "status": 404,
         "code": "NOT_FOUND", "fbtrace_id": None},
    ]  # fmt: skip
    assert "joe-at-example" not in log_capture.stream.getvalue()
