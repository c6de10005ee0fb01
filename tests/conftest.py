"""Fixtures only; the helpers they use live in tests/support.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient

from server import logs
from server.app import create_app
from server.config import Config
from server.delivery.transport import GraphTransport
from tests.postgres import Server, start_server
from tests.support import (
    NOW,
    PROJECT_TOKEN,
    FakeGraph,
    LogCapture,
    MakeClient,
    fixed_clock,
    make_config,
    rsa_private_key,
    sign_token,
)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """One PostgreSQL server for the session (tests/postgres.py), stopped at its end."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: Server) -> Iterator[str]:
    """A database of the test's own on that server."""
    with postgres_server.fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """Each backend in turn: None for the SQLite file, else a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa_private_key()


@pytest.fixture(scope="session")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa_private_key()


@pytest.fixture
def sign(rsa_key: rsa.RSAPrivateKey) -> Callable[..., str]:
    """A user token for PROJECT signed with `rsa_key` (see support.sign_token)."""

    def _sign(sub: str | None = "user-1", *, now: float | None = None, **claims: Any) -> str:
        return sign_token(rsa_key, sub, now=now, **claims)

    return _sign


@pytest.fixture
def graph() -> FakeGraph:
    """The fake Graph, on the tests' fixed clock (NOW)."""
    return FakeGraph()


@pytest.fixture
def config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Config:
    return make_config(tmp_path, rsa_key, facebook_access_token=PROJECT_TOKEN)


@pytest.fixture
def make_client(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, graph: FakeGraph
) -> Iterator[MakeClient]:
    """The real app in a TestClient, built by the one factory (support.MakeClient)."""
    default_graph = graph
    with ExitStack() as clients:

        def make(
            config: Config | None = None,
            *,
            graph: FakeGraph | None = None,
            transport: GraphTransport | None = None,
            clock: float | Callable[[], float] = NOW,
            graph_settings: Mapping[str, Any] | None = None,
            delivery_settings: Mapping[str, Any] | None = None,
            **project: Any,
        ) -> TestClient:
            if config is None:
                project = {"facebook_access_token": PROJECT_TOKEN, **project}
                config = make_config(
                    tmp_path,
                    rsa_key,
                    graph_settings=graph_settings,
                    delivery_settings=delivery_settings,
                    **project,
                )
            app = create_app(
                config,
                graph_transport=transport or (graph or default_graph).transport(),
                clock=clock if callable(clock) else fixed_clock(clock),
            )
            return clients.enter_context(TestClient(app, raise_server_exceptions=False))

        yield make


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    """The app with a project-wide token, Graph faked in-process, at NOW."""
    return make_client()


@pytest.fixture
def log_capture() -> Iterator[LogCapture]:
    capture = LogCapture()
    logs.configure(capture.stream)
    yield capture
    logs._sink.flush()
    logs._sink.stream = None  # back to silent, as for every other test
