"""Shared fixtures: real keys and tokens, a config on disk, and a recording fake of Graph at
the transport seam (the only fake: everything inside funnelgate is real)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.testclient import TestClient

from server.app import create_app
from server.config import Config, parse_config
from server.delivery.transport import HttpxTransport
from server.storage.crypto import new_secret_key

PROJECT = "5f1b0c3e-aaaa-bbbb-cccc-000000000001"
PIXEL = "123456789012345"
NOW = 1_795_000_000.0  # 2026-11-18T11:06:40Z, fixed so event times are deterministic
SECRET_KEY = new_secret_key()  # encrypts the stored access tokens of make_config's database


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def sign(rsa_key: rsa.RSAPrivateKey) -> Callable[..., str]:
    """A Paragon user token for PROJECT; claims can be overridden or removed (value None)."""

    def _sign(sub: str | None = "user-1", *, now: float | None = None, **claims: Any) -> str:
        # By default valid both at the tests' fixed NOW and at the real time of a live server.
        issued = int(NOW if now is None else now)
        ttl = 20 * 365 * 86400 if now is None else 3600
        payload: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + ttl, **claims}
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, rsa_key, algorithm="RS256")

    return _sign


def project_table(rsa_key: rsa.RSAPrivateKey, **extra: Any) -> dict[str, Any]:
    return {"id": PROJECT, "jwt_public_key": public_pem(rsa_key), **extra}


def make_config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, **project: Any) -> Config:
    raw = {
        "graph": {"base_url": "https://graph.example.test", "retry_deadline_seconds": 5.0},
        "storage": {"url": "sqlite:///funnelgate.db"},
        "projects": [project_table(rsa_key, **project)],
    }
    return parse_config(raw, base_dir=tmp_path, env={"FUNNELGATE_SECRET_KEY": SECRET_KEY})


@dataclass
class FakeGraph:
    """Graph at the transport seam: records every request; answers from a script, then 200."""

    script: list[Callable[[httpx.Request], httpx.Response]] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            return self.script.pop(0)(request)
        return httpx.Response(
            200, json={"events_received": 1, "messages": [], "fbtrace_id": "AbC123"}
        )

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


def graph_error(status: int, code: int, **fields: Any) -> Callable[[httpx.Request], httpx.Response]:
    error = {"message": f"(#{code}) test error", "type": "OAuthException", "code": code,
             "fbtrace_id": "ErrTrace", **fields}  # fmt: skip
    return lambda _request: httpx.Response(status, json={"error": error})


@pytest.fixture
def graph() -> FakeGraph:
    return FakeGraph()


@pytest.fixture
def config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Config:
    return make_config(tmp_path, rsa_key, facebook_access_token="EAAB-project-token")


@pytest.fixture
def client(config: Config, graph: FakeGraph) -> Iterator[TestClient]:
    app = create_app(
        config,
        graph_transport=HttpxTransport(httpx.MockTransport(graph.handler)),
        clock=lambda: NOW,
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def funnel_parameters(**overrides: Any) -> dict[str, Any]:
    """A realistic website Purchase with full customer data."""
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
