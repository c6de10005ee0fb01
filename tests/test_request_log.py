"""The request log line (README, Logs): one per request, naming the endpoint, project, tool,
status, the error's stable `code` and Graph's fbtrace_id; never a customer value."""

from __future__ import annotations

from typing import Any

from tests.support import PROJECT, TRACE_ID, funnel_parameters

URL = f"/projects/{PROJECT}/tools"
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
