"""Loopback end to end: a real `funnelgate serve` process, a fake Graph on 127.0.0.1, real
signed tokens, and httpx as the caller. Bounded: every request has a timeout."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.live import serving
from tests.support import (
    PIXEL,
    WallClockGraph,
    free_port,
    funnel_parameters,
    public_pem,
    rsa_private_key,
    sign_token,
    wait_ready,
)

PROJECT = "e2e-project"
UNCONNECTED = "e2e-unconnected"
ACCESS_TOKEN = "EAAB-e2e-secret-token"
PII = ["Joe.Smith@Example.COM", "joe.smith@example.com", "Smith", "San Francisco", "203.0.113.7",
       "Mozilla/5.0 (Macintosh)", ACCESS_TOKEN]  # fmt: skip
FUNNELGATE = Path(sys.executable).parent / "funnelgate"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"rsa": rsa_private_key(), "other": rsa_private_key()}


@pytest.fixture(scope="module")
def fake_graph() -> Iterator[WallClockGraph]:
    server = WallClockGraph()
    with serving(server.app(), lifespan="off") as base_url:
        server.base_url = base_url
        yield server


@dataclass(frozen=True)
class Served:
    """The running `funnelgate serve`: a client for it and the file its output goes to."""

    http: httpx.Client
    log: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory, keys, fake_graph) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("e2e")
    (root / "project.pub.pem").write_text(public_pem(keys["rsa"]))
    (root / "config.toml").write_text(
        f"""
[graph]
base_url = "https://graph.facebook.com"   # overridden by FUNNELGATE_GRAPH_BASE_URL below
timeout_seconds = 0.5

[delivery]
sync_budget_seconds = 3

[[projects]]
id = "{PROJECT}"
jwt_public_key_file = "project.pub.pem"
facebook_access_token = "{ACCESS_TOKEN}"

[[projects]]
id = "{UNCONNECTED}"
jwt_public_key_file = "project.pub.pem"
"""
    )
    port = free_port()
    log_path = root / "server.log"
    env = {**os.environ, "FUNNELGATE_GRAPH_BASE_URL": fake_graph.base_url}
    env.pop("FUNNELGATE_CONFIG", None)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(FUNNELGATE), "serve", "--config", str(root / "config.toml"), "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, process)
            with httpx.Client(base_url=base, timeout=10) as http:
                yield Served(http, log_path)
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def graph(fake_graph: WallClockGraph) -> WallClockGraph:
    fake_graph.reset()
    return fake_graph


def token(key: Any, *, project: str = PROJECT, **claims: Any) -> str:
    """A token valid now for `project`, with its audience."""
    claims = {"aud": f"useparagon.com/{project}", **claims}
    return sign_token(key, now=time.time(), ttl=600, **claims)


def run(served: Served, bearer: str | None, parameters: dict[str, Any], *, project: str = PROJECT,
        path: str = "tools", key: str = "tool") -> httpx.Response:  # fmt: skip
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return served.http.post(
        f"/projects/{project}/{path}",
        json={key: "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": parameters},
        headers=headers,
    )


def live_parameters(**overrides: Any) -> dict[str, Any]:
    """The full event, timed now so Meta's 7-day window (enforced by the fake) accepts it."""
    return funnel_parameters(eventTime=None, **overrides)


def test_event_reaches_graph_hashed_with_the_token_in_the_body(served, graph, keys):
    response = run(served, token(keys["rsa"]), live_parameters())
    assert response.status_code == 200, response.text
    assert response.json()["events_received"] == 1
    [received] = graph.received
    assert received.path == f"/v24.0/{PIXEL}/events"
    assert received.query == ""
    body = received.json()
    assert body["access_token"] == ACCESS_TOKEN
    assert body["data"][0]["user_data"]["em"] == [
        hashlib.sha256(b"joe.smith@example.com").hexdigest()
    ]
    assert graph.sandbox.accepted[-1]["body"]["data"] == body["data"]


def test_legacy_actions_path(served, graph, keys):
    response = run(served, token(keys["rsa"]), live_parameters(), path="actions", key="action")
    assert response.status_code == 200
    assert len(graph.received) == 1


def _none_alg_token() -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'user-1', 'iat': now, 'exp': now + 600})}."


def _hs256_with_public_key(keys: dict[str, Any]) -> str:
    now = int(time.time())
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    claims = json.dumps({"sub": "user-1", "iat": now, "exp": now + 600}).encode()
    payload = base64.urlsafe_b64encode(claims).rstrip(b"=")
    signature = hmac.new(public_pem(keys["rsa"]).encode(), header + b"." + payload, hashlib.sha256)
    return (
        header + b"." + payload + b"." + base64.urlsafe_b64encode(signature.digest()).rstrip(b"=")
    ).decode()


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda k: None, id="missing-header"),
        pytest.param(lambda k: "not.a.jwt", id="malformed"),
        pytest.param(lambda k: _none_alg_token(), id="alg-none"),
        pytest.param(_hs256_with_public_key, id="hs256-signed-with-public-key"),
        pytest.param(lambda k: token(k["other"]), id="wrong-key"),
        pytest.param(lambda k: token(k["rsa"], exp=int(time.time()) - 120), id="expired"),
        pytest.param(lambda k: token(k["rsa"], nbf=int(time.time()) + 600), id="not-yet-valid-nbf"),
        pytest.param(lambda k: token(k["rsa"], iat=int(time.time()) + 600), id="issued-in-future"),
        pytest.param(lambda k: token(k["rsa"], sub=None), id="missing-sub"),
        pytest.param(lambda k: token(k["rsa"], exp=None), id="missing-exp"),
        pytest.param(lambda k: token(k["rsa"], iat=None), id="missing-iat"),
        pytest.param(lambda k: token(k["rsa"], aud="useparagon.com/another"), id="wrong-audience"),
        pytest.param(lambda k: token(k["rsa"], pad="x" * 9000), id="oversized"),
        pytest.param(
            lambda k: token(ec.generate_private_key(ec.SECP256R1())),
            id="es256-for-rsa-project",
        ),
    ],
)
def test_every_bad_token_is_401_json(served, graph, keys, make_token):
    response = run(served, make_token(keys), live_parameters())
    assert response.status_code == 401
    assert response.json()["code"] == "UNAUTHORIZED"
    assert graph.received == []


def test_token_without_audience_is_accepted(served, graph, keys):
    assert run(served, token(keys["rsa"], aud=None), live_parameters()).status_code == 200


def test_validation_failure_sends_nothing(served, graph, keys):
    response = run(served, token(keys["rsa"]), live_parameters(actionSource="website", eventSourceUrl=None,
                                                              customerClientUserAgent=None))  # fmt: skip
    assert response.status_code == 400
    paths = {e["path"] for e in response.json()["errors"]}
    assert paths == {"parameters.eventSourceUrl", "parameters.customerClientUserAgent"}
    assert graph.received == []


def test_transient_failure_then_success_keeps_the_event_id(served, graph, keys):
    graph.script.append(
        {"status": 503, "error": {"message": "busy", "code": 2, "is_transient": True}}
    )
    response = run(served, token(keys["rsa"]), live_parameters(eventId=None))
    assert response.status_code == 200
    first, second = graph.received
    assert first.json()["data"][0]["event_id"] == second.json()["data"][0]["event_id"]


def test_permanent_failure_is_tried_once(served, graph, keys):
    graph.script.append({"status": 400, "error": {"message": "Invalid parameter", "code": 100}})
    response = run(served, token(keys["rsa"]), live_parameters())
    assert (response.status_code, response.json()["code"]) == (400, "UPSTREAM_REJECTED")
    assert response.json()["upstream"]["code"] == 100
    assert len(graph.received) == 1


def test_graph_slower_than_the_budget_gets_a_202_then_the_event_is_delivered(served, graph, keys):
    """Meta takes 4 s three times: the attempts time out (0.5 s, then longer), the call answers
    202 within its 3 s budget, and the dispatcher delivers the event afterwards."""
    graph.script.extend({"delay": 4.0} for _ in range(3))
    bearer = token(keys["rsa"])
    started = time.monotonic()
    response = run(served, bearer, live_parameters())
    assert response.status_code == 202, response.text
    assert time.monotonic() - started < 8  # the 3 s budget, inside a 10 s caller timeout
    body = response.json()
    assert (body["status"], body["reason"], body["events_received"]) == (
        "queued", "meta_unavailable", 1,
    )  # fmt: skip
    assert response.headers["location"] == body["status_url"]
    auth = {"Authorization": f"Bearer {bearer}"}
    deadline = time.monotonic() + 20
    status = served.http.get(body["status_url"], headers=auth).json()
    while status["status"] != "delivered" and time.monotonic() < deadline:
        time.sleep(0.2)
        status = served.http.get(body["status_url"], headers=auth).json()
    assert status["status"] == "delivered", status
    assert status["event_id"] == body["event_ids"][0]
    graph.script.clear()


def test_sandbox_rules_reject_what_meta_rejects(served, graph, keys):
    """The fake enforces Meta's rules on the wire: a hand-made unhashed event is refused."""
    status, answer = graph.sandbox.handle("v24.0", PIXEL, {
        "access_token": "t", "data": [{"event_name": "Lead", "event_time": int(time.time()),
                                       "action_source": "email", "user_data": {"em": ["joe@example.com"]}}],
    })  # fmt: skip
    assert status == 400 and answer["error"]["code"] == 100


def test_unconnected_user_is_told_integration_not_enabled(served, graph, keys):
    response = run(
        served, token(keys["rsa"], project=UNCONNECTED), live_parameters(), project=UNCONNECTED
    )
    assert response.status_code == 400
    assert response.json() == {
        "message": "Integration not enabled for user.", "code": "INTEGRATION_NOT_ENABLED", "retryable": False,
    }  # fmt: skip
    assert graph.received == []


def test_body_over_1_mib_is_413(served, graph, keys):
    response = run(served, token(keys["rsa"]), live_parameters(contentName="x" * (1024 * 1024)))
    assert (response.status_code, response.json()["code"]) == (413, "PAYLOAD_TOO_LARGE")
    assert graph.received == []


def test_logs_hold_no_personal_data_tokens_or_jwts(served, graph, keys):
    user_token = token(keys["rsa"])
    assert run(served, user_token, live_parameters()).status_code == 200
    graph.script.append({"status": 400, "error": {"message": "bad", "code": 100}})
    assert run(served, user_token, live_parameters()).status_code == 400
    assert run(served, "garbage." + user_token[10:], live_parameters()).status_code == 401
    time.sleep(0.2)  # let the server flush its last lines
    text = served.log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(line["event"] == "request" and line["status"] == 200 for line in lines)
    assert any(line["event"] == "graph_attempt" for line in lines)
    for secret in [*PII, user_token, user_token.split(".")[1]]:
        assert secret not in text
