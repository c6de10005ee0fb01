"""`/metrics` and `/readyz` over real HTTP on loopback (the fake Graph as the transport): the
numbers a scrape shows, parsed by prometheus-client's own parser, match the calls made; the
metrics port; the `[metrics]` table; readiness turning 503 when storage or the dispatcher is
down; and no label or value carrying what a caller sent."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any, cast

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient

from server import logs
from server.app import create_app
from server.config import Config, MetricsSettings, parse_config
from server.errors import ConfigError
from tests.live import serving
from tests.support import (
    NOW,
    PIXEL,
    PROJECT,
    PROJECT_TOKEN,
    FakeGraph,
    Step,
    free_port,
    funnel_parameters,
    graph_error,
    public_pem,
    sign_token,
)

TOOL = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"
RUN = f"/projects/{PROJECT}/tools"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


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


def samples(text: str) -> Samples:
    """Every sample of a scrape, by name and labels, read by prometheus-client's parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(http: httpx.Client, path: str = "/metrics") -> Samples:
    response = http.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(response.text)


def value(found: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (a counter not yet counted)."""
    return found.get((name, frozenset(labels.items())), 0.0)


def series(found: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in found.items() if n == name}


def scrape_until(
    http: httpx.Client, done: Callable[[Samples], bool], what: str, seconds: float = 10
) -> tuple[Samples, int]:
    """Scrapes until `done` holds (bounded); the samples and how many scrapes it took."""
    deadline = time.monotonic() + seconds
    scrapes = 0
    while True:
        found = scrape(http)
        scrapes += 1
        if done(found):
            return found, scrapes
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.05)


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


# --- the numbers match the calls -----------------------------------------------------------


def test_a_scrape_counts_the_calls_the_events_and_the_graph_requests(config, sign):
    graph = FakeGraph()
    with served(config, graph) as (http, _):
        token = sign()
        for n in range(3):  # delivered at once
            assert run(http, token, funnel_parameters(eventId=f"sync-{n}")).status_code == 200
        graph.script.append(graph_error(400, 100))  # Meta refuses this one
        assert run(http, token, funnel_parameters(eventId="refused")).status_code == 400
        for n in range(2):  # queued, then delivered by the dispatcher
            queued = run(http, token, funnel_parameters(eventId=f"later-{n}"),
                         Prefer="respond-async")  # fmt: skip
            assert queued.status_code == 202
        assert run(http, "not-a-jwt", funnel_parameters()).status_code == 401
        assert run(http, token, funnel_parameters(), tool="NO_SUCH_TOOL").status_code == 404
        assert http.get("/no/such/path").status_code == 404
        assert http.get("/healthz").status_code == 200

        def all_delivered(found: Samples) -> bool:
            return value(found, "funnelgate_events_total", project=PROJECT,
                         outcome="delivered") == 5  # fmt: skip

        found, scrapes = scrape_until(http, all_delivered, "the queued events delivered")

    assert series(found, "funnelgate_calls_total") == {
        frozenset(labels.items()): count
        for labels, count in [
            ({"route": "run_tool", "tool": TOOL, "status": "200", "code": ""}, 3),
            ({"route": "run_tool", "tool": TOOL, "status": "400", "code": "UPSTREAM_REJECTED"}, 1),
            ({"route": "run_tool", "tool": TOOL, "status": "202", "code": ""}, 2),
            ({"route": "run_tool", "tool": "", "status": "401", "code": "UNAUTHORIZED"}, 1),
            ({"route": "run_tool", "tool": "other", "status": "404", "code": "UNKNOWN_TOOL"}, 1),
            ({"route": "unmatched", "tool": "", "status": "404", "code": "NOT_FOUND"}, 1),
            ({"route": "healthz", "tool": "", "status": "200", "code": ""}, 1),
            # each scrape is counted once answered: the last one is not in its own numbers
            ({"route": "metrics", "tool": "", "status": "200", "code": ""}, scrapes - 1),
        ]
    }
    assert series(found, "funnelgate_events_total") == {
        frozenset({"project": PROJECT, "outcome": outcome}.items()): count
        for outcome, count in [
            ("accepted", 6),
            ("delivered", 5),
            ("failed", 1),
            ("queued", 2),
            ("retried", 0),
        ]  # every outcome is there from the start, retried too
    }
    assert series(found, "funnelgate_events_failed_total") == {
        frozenset({"project": PROJECT, "code": "UPSTREAM_REJECTED"}.items()): 1
    }
    # Meta got 3 sync requests, the refused one, and the dispatcher's (1 or 2: it may gather
    # both queued events into one request).
    requests = len(graph.received)
    assert requests in (5, 6)
    assert series(found, "funnelgate_graph_requests_total") == {
        frozenset({"verdict": "delivered"}.items()): requests - 1,
        frozenset({"verdict": "rejected"}.items()): 1,
        frozenset({"verdict": "retry"}.items()): 0,
        frozenset({"verdict": "auth"}.items()): 0,
    }
    assert value(found, "funnelgate_graph_request_duration_seconds_count") == requests
    assert value(found, "funnelgate_graph_request_duration_seconds_bucket", le="+Inf") == requests
    assert value(found, "funnelgate_call_duration_seconds_count", route="run_tool") == 8
    assert value(found, "funnelgate_calls_in_flight") == 0
    assert value(found, "funnelgate_queue_events", status="queued") == 0
    assert value(found, "funnelgate_queue_events", status="held") == 0
    assert value(found, "funnelgate_dead_letter_events") == 0
    assert value(found, "funnelgate_queue_oldest_age_seconds") == 0
    assert ("funnelgate_log_lines_dropped_total", frozenset()) in found


def test_the_queue_gauges_come_from_the_outbox(config, sign):
    """Queued (waiting for a retry), held (credential refused), failed (kept as a dead
    letter), and how long the oldest waiting event has waited, on the app's clock."""
    graph = FakeGraph()
    clock = Clock()
    with served(config, graph, clock) as (http, _):
        token = sign()

        def queue(event_id: str, answer: Step) -> None:
            graph.script.append(answer)
            response = run(http, token, funnel_parameters(eventId=event_id),
                           Prefer="respond-async")  # fmt: skip
            assert response.status_code == 202

        queue("refused", graph_error(400, 100))
        scrape_until(http, lambda f: value(f, "funnelgate_dead_letter_events") == 1, "failed")
        queue("held", graph_error(400, 190))  # the token refused: held for a new one
        scrape_until(
            http, lambda f: value(f, "funnelgate_queue_events", status="held") == 1, "held"
        )
        # Meta unavailable: due again after a backoff, which the stopped clock never reaches.
        # (Last: the failure opens the pixel's breaker, which the stopped clock never closes.)
        queue("retrying", Step(status=503, content=b"unavailable"))
        found, _ = scrape_until(
            http,
            lambda f: value(f, "funnelgate_events_total", project=PROJECT, outcome="retried") == 1,
            "retried",
        )
        assert value(found, "funnelgate_queue_events", status="queued") == 1
        assert value(found, "funnelgate_dead_letter_events") == 1
        assert value(found, "funnelgate_queue_oldest_age_seconds") == 0
        assert value(found, "funnelgate_events_failed_total", project=PROJECT,
                     code="UPSTREAM_REJECTED") == 1  # fmt: skip

        clock.now = NOW + 90  # every waiting event was accepted at NOW
        assert value(scrape(http), "funnelgate_queue_oldest_age_seconds") == 90


def test_calls_in_flight_are_the_calls_being_processed(config, sign):
    graph = FakeGraph()
    with served(config, graph) as (http, _):
        graph.script.append(Step(delay=1.0))  # Meta answers slowly
        answers: list[int] = []
        slow = threading.Thread(
            target=lambda: answers.append(run(http, sign(), funnel_parameters()).status_code)
        )
        slow.start()
        try:
            scrape_until(http, lambda f: value(f, "funnelgate_calls_in_flight") == 1, "in flight")
        finally:
            slow.join(timeout=10)
        assert answers == [200]
        assert value(scrape(http), "funnelgate_calls_in_flight") == 0


def test_openmetrics_is_served_when_asked_for(config, sign):
    with served(config, FakeGraph()) as (http, _):
        assert run(http, sign(), funnel_parameters()).status_code == 200
        response = http.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    parsed = openmetrics(response.text)  # type: ignore[no-untyped-call]  # (no annotations)
    families = {family.name: family for family in parsed}
    assert families["funnelgate_calls"].type == "counter"  # OpenMetrics names drop `_total`
    assert families["funnelgate_graph_request_duration_seconds"].type == "histogram"


def test_dropped_log_lines_are_counted(config):
    """A buffer too small for the lines logged: the lines dropped show in the metrics."""
    with served(config, FakeGraph()) as (http, _):
        before = logs.dropped_lines()
        logs.configure(cast(IO[str], _NeverRead()), buffer_bytes=400)
        try:
            for _ in range(50):
                logs.log("flood", text="x" * 200)
            dropped = logs.dropped_lines()
            assert dropped > before
            assert value(scrape(http), "funnelgate_log_lines_dropped_total") >= dropped
        finally:
            logs._sink.flush()
            logs._sink.stream = None  # back to silent, as for every other test


class _NeverRead:
    """A stream that takes lines and keeps none."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError("not a file")


# --- no personal data, no secret -----------------------------------------------------------

EMAIL = "Ada.Lovelace@Example.ORG"
PHONE = "+44 20 7946 0958"
IP = "198.51.100.23"
USER = "user-7f3a9c"
EXTERNAL_ID = "crm-ada-1815"


def test_no_label_or_value_carries_what_a_caller_sent(config, rsa_key):
    graph = FakeGraph()
    token = sign_token(rsa_key, USER)
    parameters = funnel_parameters(
        eventId="evt-private-31337", customerEmail=EMAIL, customerPhone=PHONE,
        customerClientIpAddress=IP, customerExternalId=EXTERNAL_ID,
    )  # fmt: skip
    with served(config, graph) as (http, _):

        def delivered(count: int) -> Callable[[Samples], bool]:
            return lambda f: value(f, "funnelgate_events_total", project=PROJECT,
                                   outcome="delivered") == count  # fmt: skip

        assert run(http, token, parameters).status_code == 200
        assert run(http, token, parameters, Prefer="respond-async").status_code == 202
        scrape_until(http, delivered(2), "the queued event delivered")
        graph.script.append(graph_error(400, 100, message=f"(#100) bad {EMAIL}"))
        assert run(http, token, parameters).status_code == 400
        # A tool named with personal data, a token and the user id: caller text as a label.
        for name in (EMAIL, token, USER, PHONE, IP, *(f"made-up-{n}" for n in range(20))):
            assert run(http, token, parameters, tool=name).status_code == 404
        assert run(http, token, parameters, **{"X-Request-ID": USER}).status_code == 200
        assert http.get(f"/projects/{PROJECT}/events/evt-private-31337",
                        headers={"Authorization": f"Bearer {token}"}).status_code == 200  # fmt: skip
        scrape_until(http, delivered(3), "every event counted")
        texts = [http.get("/metrics").text,
                 http.get("/metrics", headers={"Accept": "application/openmetrics-text"}).text]  # fmt: skip
    digits = "".join(c for c in PHONE if c.isdigit())
    secrets = [EMAIL, EMAIL.lower(), PHONE, digits, IP, USER, EXTERNAL_ID, token, PROJECT_TOKEN,
               "evt-private-31337", PIXEL, "Purchase",
               hashlib.sha256(EMAIL.lower().encode()).hexdigest(),
               hashlib.sha256(digits.encode()).hexdigest()]  # fmt: skip
    for text in texts:
        assert [s for s in secrets if s in text] == []
    # Twenty-five tool names nobody has: one series, `other`.
    tools = {dict(labels)["tool"] for labels in series(samples(texts[0]), "funnelgate_calls_total")}
    assert tools == {TOOL, "other", ""}


# --- where the metrics are served ------------------------------------------------------------


def test_a_metrics_port_serves_them_there_and_not_on_the_main_port(config, sign):
    port = free_port()
    config = dataclasses.replace(config, metrics=MetricsSettings(port=port))
    side = f"http://127.0.0.1:{port}"
    with served(config, FakeGraph()) as (http, _), httpx.Client(base_url=side, timeout=5) as m:
        assert run(http, sign(), funnel_parameters()).status_code == 200
        found = scrape(m)
        assert value(found, "funnelgate_calls_total", route="run_tool", tool=TOOL,
                     status="200", code="") == 1  # fmt: skip
        assert value(found, "funnelgate_events_total", project=PROJECT, outcome="delivered") == 1
        assert http.get("/metrics").status_code == 404
        assert "/metrics" not in http.get("/openapi.json").json()["paths"]
        assert m.get("/healthz").status_code == 404  # the metrics port serves the metrics only
        assert m.post("/metrics").status_code == 405
    with pytest.raises(httpx.ConnectError):  # stopped with the app
        httpx.get(f"{side}/metrics", timeout=2)


def test_a_metrics_port_in_use_stops_start_up(config, log_capture):
    with closing(socket.socket()) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = dataclasses.replace(config, metrics=MetricsSettings(port=port))
        app = create_app(config, graph_transport=FakeGraph().transport())
        with pytest.raises(OSError, match="in use"), TestClient(app):
            pass
    assert logs.flush(5)
    lines = [orjson.loads(line) for line in log_capture.stream.getvalue().splitlines()]
    [refused] = [line for line in lines if line["event"] == "metrics_port_failed"]
    assert (refused["host"], refused["port"], refused["level"]) == ("127.0.0.1", port, "error")


def test_the_metrics_path_can_move(config):
    config = dataclasses.replace(config, metrics=MetricsSettings(path="/internal/prometheus"))
    with served(config, FakeGraph()) as (http, _):
        assert http.get("/metrics").status_code == 404
        assert "funnelgate_calls_total" in http.get("/internal/prometheus").text
        paths = http.get("/openapi.json").json()["paths"]
    assert "/internal/prometheus" in paths
    assert "/metrics" not in paths


def test_metrics_off_means_no_route(config, sign):
    config = dataclasses.replace(config, metrics=MetricsSettings(enabled=False))
    with served(config, FakeGraph()) as (http, app):
        assert run(http, sign(), funnel_parameters()).status_code == 200
        response = http.get("/metrics")
        assert response.status_code == 404
        assert response.json()["code"] == "NOT_FOUND"
        assert "/metrics" not in http.get("/openapi.json").json()["paths"]
        assert http.get("/readyz").status_code == 200
        assert app.state.metrics is None


# --- the [metrics] table -------------------------------------------------------------------


def parse(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, metrics: dict[str, Any]) -> Config:
    raw = {"metrics": metrics, "storage": {"url": "sqlite:///f.db"},
           "projects": [{"id": PROJECT, "jwt_public_key": public_pem(rsa_key)}]}  # fmt: skip
    return parse_config(raw, base_dir=tmp_path, env={})


def test_the_metrics_table_defaults(tmp_path, rsa_key):
    assert parse(tmp_path, rsa_key, {}).metrics == MetricsSettings(
        enabled=True, path="/metrics", port=None, host="127.0.0.1"
    )
    chosen: dict[str, Any] = {"enabled": True, "path": "/m", "port": 9464, "host": "0.0.0.0"}
    assert parse(tmp_path, rsa_key, chosen).metrics == MetricsSettings(**chosen)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"enable": False}, "unknown key 'enable' (did you mean 'enabled'?)"),
        ({"enabled": 0}, "enabled must be true or false"),
        ({"port": "9464"}, "port must be a TCP port number"),
        ({"port": True}, "port must be a TCP port number"),
        ({"port": 70000}, "port must be a TCP port number"),
        ({"path": "metrics"}, "path must be an absolute path"),
        ({"path": "/metrics/"}, "path must be an absolute path"),
        ({"path": "/m/{name}"}, "path must be an absolute path"),
        ({"path": "/healthz"}, "path /healthz is already one of the server's routes"),
        ({"path": "/projects/x"}, "already one of the server's routes"),
        ({"host": "0.0.0.0"}, "host needs port"),
        ({"port": 9464, "host": ""}, "host must be a non-empty string"),
    ],
)
def test_the_metrics_table_refuses_what_it_cannot_use(tmp_path, rsa_key, table, expected):
    with pytest.raises(ConfigError, match=r"\[metrics\]") as refused:
        parse(tmp_path, rsa_key, table)
    assert expected in str(refused.value)


def test_the_metrics_port_may_use_a_path_the_main_server_has(tmp_path, rsa_key):
    assert parse(tmp_path, rsa_key, {"port": 9464, "path": "/healthz"}).metrics.path == "/healthz"


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


# --- several workers (serve --workers N) ---------------------------------------------------


def test_workers_files_are_summed_by_any_scrape_and_the_supervisors(tmp_path, monkeypatch):
    """Two workers in one test process: the client's file-backed values, each worker named by
    its own pid. Counters and histograms add up, the in-flight gauge counts live workers only,
    the dropped log lines of each are published, and the queue is read once, not summed."""
    from prometheus_client import values
    from prometheus_client.multiprocess import mark_process_dead

    from server import metrics as metrics_module
    from server.storage.database import SqliteDatabase
    from server.storage.outbox import Outbox

    directory = tmp_path / "metrics"
    directory.mkdir()
    Outbox(tmp_path / "funnelgate.db", clock=time.time).close()  # an empty outbox for the gauges
    database = SqliteDatabase(tmp_path / "funnelgate.db")
    monkeypatch.setattr(metrics_module, "_shared_dir", str(directory))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))  # where the values go
    dropped = [0]
    monkeypatch.setattr(logs, "dropped_lines", lambda: dropped[0])

    def worker(pid: int) -> metrics_module.Metrics:
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: pid))  # type: ignore[no-untyped-call]
        made = metrics_module.Metrics(tools=[TOOL], codes=[], projects=[PROJECT])
        made.watch(database)
        return made

    first, second = worker(101), worker(102)
    try:
        first.call(None, TOOL, 200, None, 0.01)
        second.call(None, TOOL, 200, None, 0.02)
        second.call(None, TOOL, 200, None, 0.03)
        first.in_flight.inc()
        second.in_flight.inc(2)
        dropped[0] = 5
        first.publish_dropped()  # 5 from the first worker
        dropped[0] = 8
        second.publish_dropped()  # 8 from the second (each worker counts its own)
        totals = metrics_module.WorkerTotals(str(directory))
        totals.watch(database)
        try:
            # (The second worker's scrape; the first's would publish the fake count again.)
            for exposing in (second, totals):
                found = samples(exposing.exposition(None)[0].decode())
                labels = {"route": "unmatched", "tool": TOOL, "status": "200", "code": ""}
                assert value(found, "funnelgate_calls_total", **labels) == 3
                assert value(found, "funnelgate_call_duration_seconds_count",
                             route="unmatched") == 3  # fmt: skip
                assert value(found, "funnelgate_calls_in_flight") == 3
                assert value(found, "funnelgate_log_lines_dropped_total") == 13
                assert value(found, "funnelgate_queue_events", status="queued") == 0
                assert len(series(found, "funnelgate_queue_events")) == 2  # once, not per worker
            mark_process_dead(102, str(directory))  # type: ignore[no-untyped-call]
            found = samples(totals.exposition(None)[0].decode())
            assert value(found, "funnelgate_calls_in_flight") == 1  # live workers only
            assert value(found, "funnelgate_calls_total", **labels) == 3  # counts stay
        finally:
            totals.unwatch()
    finally:
        first.unwatch()
        second.unwatch()
        database.close()
