"""What the tests share: keys and tokens, the project's config, realistic parameters, and the
one fake of Graph (the only fake: everything inside funnelgate is real).

Test modules import helpers from here, never from conftest.py (which holds fixtures only) or
from each other.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from server import logs
from server.config import Config, parse_config
from server.delivery.transport import GraphTransport, HttpxTransport
from server.sandbox import SandboxGraph
from server.storage.crypto import new_secret_key

PROJECT = "5f1b0c3e-aaaa-bbbb-cccc-000000000001"
PIXEL = "123456789012345"
NOW = 1_795_000_000.0  # 2026-11-18T11:06:40Z, fixed so event times are deterministic
SECRET_KEY = new_secret_key()  # encrypts the stored access tokens of make_config's database
PROJECT_TOKEN = "EAAB-project-token"  # the default project-wide Meta access token
TRACE_ID = "AbC123"  # the fake Graph's fbtrace_id unless a test asks for others

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# Keys and tokens


def rsa_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def sign_token(
    key: PrivateKey,
    sub: str | None = "user-1",
    *,
    now: float | None = None,
    ttl: int | None = None,
    algorithm: str | None = None,
    **claims: Any,
) -> str:
    """A Paragon user token; claims can be overridden or removed (value None).

    By default valid both at the tests' fixed NOW and at the real time of a live server. The
    algorithm follows the key (RS256 for RSA, ES256 for P-256) unless given.
    """
    issued = int(NOW if now is None else now)
    lifetime = ttl if ttl is not None else (20 * 365 * 86400 if now is None else 3600)
    payload: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + lifetime, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    chosen = algorithm or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
    return jwt.encode(payload, key, algorithm=chosen)


# Config and parameters


def make_config(
    tmp_path: Path,
    key: PrivateKey,
    *,
    graph_settings: Mapping[str, Any] | None = None,
    delivery_settings: Mapping[str, Any] | None = None,
    database_url: str | None = None,
    **project: Any,
) -> Config:
    """A config with one project (PROJECT, verified by `key`'s public half), parsed by the
    real parser; `graph_settings` are [graph] keys, `delivery_settings` [delivery] keys,
    `database_url` a PostgreSQL database (default: the SQLite file), `project` the project's
    own keys."""
    raw = {
        "graph": {"base_url": "https://graph.example.test", **(graph_settings or {})},
        "delivery": {"sync_budget_seconds": 5.0, **(delivery_settings or {})},
        "storage": {"url": database_url or "sqlite:///funnelgate.db"},
        "projects": [
            {"id": PROJECT, "jwt_public_key": public_pem(key)}
            | {k: v for k, v in project.items() if v is not None}  # None: leave the key out
        ],
    }
    return parse_config(raw, base_dir=tmp_path, env={"FUNNELGATE_SECRET_KEY": SECRET_KEY})


def config_toml(tables: Mapping[str, Mapping[str, Any]], *, project: str, access_token: str) -> str:
    """A config file's text for a `funnelgate serve` process: `tables` (plain values: JSON
    spells strings, numbers, booleans and lists of them as TOML does), then one project whose
    user tokens project.pub.pem (beside the file) verifies."""
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    lines += ["[[projects]]", f"id = {json.dumps(project)}",
              'jwt_public_key_file = "project.pub.pem"',
              f"facebook_access_token = {json.dumps(access_token)}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def funnel_parameters(**overrides: Any) -> dict[str, Any]:
    """A realistic website Purchase with full customer data; None removes a parameter."""
    parameters = {
        "pixel": PIXEL,
        "eventName": "Purchase",
        "actionSource": "website",
        "eventTime": "2026-11-18T06:00:00Z",
        "eventId": "order-1001",
        "eventSourceUrl": "https://shop.example.com/thanks",
        "customerEmail": " Joe.Smith@Example.COM ",
        "customerFirstName": "Joe",
        "customerLastName": "Smith",
        "customerCity": "San Francisco",
        "customerState": "CA",
        "customerCountryCode": "US",
        "customerExternalId": "crm-42",
        "customerClientIpAddress": "203.0.113.7",
        "customerClientUserAgent": "Mozilla/5.0 (Macintosh)",
        "clickId": "fb.1.1554763741205.AbCdEfGhIjKlMnOp",
        "browserId": "fb.1.1558571054389.1098115397",
        "contentId": "['ABC123', 'XYZ789']",
        "contentName": "Lettuce",
        "contentCategory": "Grocery",
    }
    parameters.update(overrides)
    return {k: v for k, v in parameters.items() if v is not None}


def fixed_clock(moment: float) -> Callable[[], float]:
    return lambda: moment


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (closed again before it is returned)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The fake Graph


@dataclass(frozen=True)
class Received:
    """One request as Graph got it, raw."""

    method: str
    url: str
    path: str
    query: str
    headers: dict[str, str]  # names lowercased
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True)
class Step:
    """One scripted answer. `delay` waits first; with no `status` the answer then comes from
    Meta's rules, else it is `status` with Graph's `{"error": error}`, or with any `content`
    (a proxy's HTML page, a truncated body, ...)."""

    status: int | None = None
    error: Mapping[str, Any] | None = None
    content: bytes = b""
    delay: float = 0.0


def graph_error(status: int, code: int, **fields: Any) -> Step:
    """Graph's error answer with Meta's error `code`; `fields` add or replace error keys."""
    error = {"message": f"(#{code}) test error", "type": "OAuthException", "code": code,
             "fbtrace_id": "ErrTrace", **fields}  # fmt: skip
    return Step(status, error=error)


def counter(prefix: str) -> Callable[[], str]:
    """Ids `prefix1`, `prefix2`, ... (e.g. one fbtrace_id per Graph request)."""
    numbers = itertools.count(1)
    return lambda: f"{prefix}{next(numbers)}"


class FakeGraph:
    """Graph's /events edge for tests: records every request, serves `script` first, and
    otherwise answers by Meta's documented rules (server/sandbox.py's SandboxGraph, on
    `clock`, with fbtrace ids from `trace_id`).

    In-process through `transport()` (httpx's MockTransport), or on loopback as the ASGI
    `app()` served by tests/live.py's `serving` (set `base_url` to where it listens).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = lambda: NOW,
        trace_id: Callable[[], str] = lambda: TRACE_ID,
    ) -> None:
        self.sandbox = SandboxGraph(clock=clock, trace_id=trace_id)
        self.received: list[Received] = []
        self.script: deque[Step | dict[str, Any]] = deque()  # dicts: Step's fields
        self.base_url = ""

    def reset(self) -> None:
        self.received.clear()
        self.script.clear()

    def bodies(self) -> list[Any]:
        return [r.json() for r in self.received]

    async def answer(self, received: Received) -> tuple[int, bytes]:
        self.received.append(received)
        if self.script:
            step = self.script.popleft()
            step = Step(**step) if isinstance(step, dict) else step
            if step.delay:
                await asyncio.sleep(step.delay)
            if step.status is not None:
                if step.error is not None:
                    return step.status, orjson.dumps({"error": step.error})
                return step.status, step.content
        return self._by_the_rules(received)

    def _by_the_rules(self, received: Received) -> tuple[int, bytes]:
        parts = received.path.strip("/").split("/")
        if received.method != "POST" or len(parts) != 3 or parts[2] != "events":
            error = {"message": "Unknown path components", "type": "OAuthException", "code": 2500}
            return 400, orjson.dumps({"error": error})
        try:
            body = orjson.loads(received.body)
        except orjson.JSONDecodeError:
            body = None
        status, answer = self.sandbox.handle(parts[0], parts[1], body)
        return status, orjson.dumps(answer)

    # In-process: httpx's MockTransport takes this async handler.
    async def handler(self, request: httpx.Request) -> httpx.Response:
        received = Received(
            method=request.method,
            url=str(request.url),
            path=request.url.path,
            query=request.url.query.decode(),
            headers=dict(request.headers),
            body=await request.aread(),
        )
        status, content = await self.answer(received)
        return httpx.Response(status, content=content, headers={"content-type": "application/json"})

    def transport(self) -> GraphTransport:
        return HttpxTransport(httpx.MockTransport(self.handler))

    # On loopback: one route that takes every path, so unknown ones are answered as Graph does.
    def app(self) -> Starlette:
        async def endpoint(request: Request) -> Response:
            received = Received(
                method=request.method,
                url=str(request.url),
                path=request.url.path,
                query=request.url.query,
                headers=dict(request.headers),
                body=await request.body(),
            )
            status, content = await self.answer(received)
            return Response(content, status_code=status, media_type="application/json")

        return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])


class WallClockGraph(FakeGraph):
    """The fake Graph on the real clock, for servers whose events are timed now."""

    def __init__(self) -> None:
        super().__init__(clock=time.time)


class MakeClient(Protocol):
    """The `make_client` fixture: an entered TestClient on the real app, closed at teardown.

    `config` defaults to `make_config` with PROJECT_TOKEN as the project-wide token (keys in
    `project` override or, with None, remove it), `graph_settings` as [graph] keys and
    `delivery_settings` as [delivery] keys; `graph`
    (default: the `graph` fixture) is wired in-process, unless `transport` replaces it (e.g.
    aiohttp to the fake on loopback); `clock` is the app's (a number for a fixed time).
    """

    def __call__(
        self,
        config: Config | None = None,
        *,
        graph: FakeGraph | None = None,
        transport: GraphTransport | None = None,
        clock: float | Callable[[], float] = NOW,
        graph_settings: Mapping[str, Any] | None = None,
        delivery_settings: Mapping[str, Any] | None = None,
        **project: Any,
    ) -> TestClient: ...


class LogCapture:
    """funnelgate's JSON log lines, written to memory (the `log_capture` fixture)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self, client: TestClient) -> list[dict[str, Any]]:
        """Every line so far. Lines wait for their event-loop turn, so `client`'s app loop is
        turned once first: the lines of the requests it has answered are then all in."""
        assert client.portal is not None, "the client must be entered"
        client.portal.call(asyncio.sleep, 0)
        assert logs.flush(5), "the log writer did not catch up"
        return [orjson.loads(line) for line in self.stream.getvalue().splitlines()]


def wait_ready(base: str, process: subprocess.Popen[bytes]) -> None:
    """Until a `funnelgate serve` process answers /healthz (20 s at most)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("funnelgate serve exited early")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("funnelgate serve did not become ready")
