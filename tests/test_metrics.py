"""`/readyz` over real HTTP on loopback (the fake Graph as the transport): readiness turning
503 when storage or the dispatcher is down."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import httpx
from starlette.applications import Starlette

from server.app import create_app
from server.config import Config
from tests.live import serving
from tests.support import (
    NOW,
    PROJECT,
    FakeGraph,
    funnel_parameters,
)

TOOL = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"
RUN = f"/projects/{PROJECT}/tools"


# --- helpers -------------------------------------------------------------------------------


class Clock:
    """The app's clock, moved by the test."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextmanager
def served(
    config: Config, graph: FakeGraph, clock: Callable[[], float] | None = None
) -> Iterator[tuple[httpx.Client, Starlette]]:
    """The app on loopback (on `clock`, NOW by default), a client for it, and the app."""
    app = create_app(config, graph_transport=graph.transport(), clock=clock or Clock())
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=10) as http:
        yield http, app


def run(
    http: httpx.Client, token: str, parameters: dict[str, Any], tool: str = TOOL, **headers: str
) -> httpx.Response:
    return http.post(RUN, json={"tool": tool, "parameters": parameters},
                     headers={"Authorization": f"Bearer {token}", **headers})  # fmt: skip


def on_loop(app: Starlette, job: Callable[[], Any]) -> None:
    """Runs `job` on the served app's event loop (the dispatcher's) and waits for it."""
    loop = app.state.dispatcher._main.get_loop()

    async def call() -> None:
        job()

    asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=10)


# --- readiness -----------------------------------------------------------------------------


def test_ready_until_the_dispatcher_dies(config):
    with served(config, FakeGraph()) as (http, app):
        ready = http.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        assert http.get("/healthz").status_code == 200
        on_loop(app, app.state.dispatcher._main.cancel)
        down = http.get("/readyz")
        assert down.status_code == 503
        assert down.headers["retry-after"] == "5"
        assert down.json() == {"message": "Not ready: dispatcher down.", "code": "NOT_READY",
                               "retryable": True, "down": ["dispatcher"]}  # fmt: skip
        assert http.get("/healthz").status_code == 200  # alive all the same


def test_not_ready_once_storage_is_gone(config):
    with served(config, FakeGraph()) as (http, app):
        assert http.get("/readyz").status_code == 200
        on_loop(app, app.state.outbox.close)  # its connections closed, its writer stopped
        down = http.get("/readyz")
        assert down.status_code == 503
        assert down.json()["down"] == ["storage"]
        assert down.json()["code"] == "NOT_READY"


def test_not_ready_while_writes_fail_and_ready_again_once_they_commit(config, sign):
    """Another process holds the database's write lock past the writer's busy timeout: the
    call fails with STORAGE_UNAVAILABLE, the probe says storage is down (its read still
    answers: WAL readers never wait), and once the lock goes the probe's empty write commits."""
    with served(config, FakeGraph()) as (http, _):
        assert http.get("/readyz").status_code == 200
        with closing(sqlite3.connect(config.storage.database_path, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            refused = run(http, sign(), funnel_parameters(), Prefer="respond-async")
            assert refused.json()["code"] == "STORAGE_UNAVAILABLE"
            down = http.get("/readyz")
            assert (down.status_code, down.json()["down"]) == (503, ["storage"])
            db.execute("ROLLBACK")
        deadline = time.monotonic() + 10
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never ready again"
            time.sleep(0.1)
