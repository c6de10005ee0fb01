"""Prometheus metrics: what `GET /metrics` shows, through the official `prometheus-client`.

Names follow Prometheus' conventions (https://prometheus.io/docs/practices/naming/): the
`funnelgate_` prefix, `_total` on counters, base units in the name (`_seconds`).

    metric                                     type       labels
    funnelgate_calls_total                     counter    route, tool, status, code
    funnelgate_call_duration_seconds           histogram  route
    funnelgate_calls_in_flight                 gauge
    funnelgate_events_total                    counter    project, outcome
    funnelgate_events_failed_total             counter    project, code
    funnelgate_graph_requests_total            counter    verdict
    funnelgate_graph_request_duration_seconds  histogram
    funnelgate_queue_events                    gauge      status       read at scrape time
    funnelgate_queue_oldest_age_seconds        gauge                   read at scrape time
    funnelgate_dead_letter_events              gauge                   read at scrape time
    funnelgate_log_lines_dropped_total         counter                 read at scrape time

Every label has a bounded set of values, none of them text a caller chose, and no personal
data or secret can reach one (https://prometheus.io/docs/practices/instrumentation/#do-not-overuse-labels):

- `route`: the endpoint's name, as the request log has it (`run_tool`, `mcp`, ...; fixed in
  the code), `unmatched` when no route matched;
- `tool`: a catalog tool's name, `other` for any other name a call gave, empty when it gave none;
- `status`: the HTTP status; `code`: one of funnelgate's error codes (openapi.json lists
  them), empty on success, `other` for anything else;
- `project`: a project id of the config (a handful, chosen by the operator), else `other`;
- `outcome`: accepted, queued, delivered, failed, retried (server/observe.py);
- `verdict`: the retry table's verdicts (delivered, retry, rejected, auth);
- `status` of the queue: queued, held.

Never a user id, a token, an event id, an IP address, a pixel id or an event name: the last
two are a call's parameters, unbounded, so they would let callers grow the series without end.

Each app has its own `CollectorRegistry`, never the client's global one: a process may build
several apps (the tests do), and each counts only its own calls. A call costs a dictionary
lookup for the children of its label set (`.labels()` runs once per set, then is cached), one
increment and one observation; a project call adds a gauge increment and decrement. The queue
gauges are read when scraped, off the event loop, on a database connection of their own.

With `serve --workers N` (N > 1), N processes answer, and a scrape reaches any one of them,
so each shows the sum of all: prometheus-client's multiprocess mode
(https://prometheus.github.io/client_python/multiprocess/). The supervisor makes a private
directory and names it in `PROMETHEUS_MULTIPROC_DIR` before the workers start (the client
chooses file-backed values at import); each worker writes its counters and histograms there
(share_between_workers) and answers a scrape with `MultiProcessCollector`'s sums, which keep
the counts of workers that died, as counters must. The in-flight gauge is `livesum`: the live
workers' sum (the supervisor calls mark_process_dead for a worker that died). The queue
gauges are not per process at all: whichever process is scraped reads them from the shared
database, so they are never summed. The dropped-lines count lives in each process's log
buffer: every worker adds what it dropped to a counter of the files every PUBLISH_SECONDS and
at each scrape. With `[metrics] port`, the supervisor serves the port (WorkerTotals), since N
workers cannot all listen on it; the workers serve nothing there. One worker (the default) is
the single process described above, with no file and no lock on a counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import uvicorn
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server import logs
from server.config import MetricsSettings
from server.delivery.policy import Verdict
from server.observe import Listener
from server.storage import outbox
from server.storage.database import ERRORS, Connection, Database, SqliteDatabase
from server.storage.outbox import Gauges
from server.storage.writer import connect
from tools.base import EventBatch

OTHER = "other"  # a label value outside the known set
UNMATCHED = "unmatched"  # the route of a request no route matched (404)
OUTCOMES = ("accepted", "queued", "delivered", "failed", "retried")
VERDICTS = frozenset(verdict.value for verdict in Verdict)
# A call takes ~0.3 ms when Meta is not involved (a listing, a refusal), 50 ms to a few seconds
# when it waits for Meta (sync delivery), up to the sync budget (4 s by default).
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# One Graph request: ~50 ms to a few seconds; timeouts start at 1.5 s (7.5 s for the dispatcher).
GRAPH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2.5, 5, 7.5, 10, 30)
# The metrics port: how many scrapes may be answered at once (uvicorn says 503 past it).
PORT_CONCURRENCY = 4
PORT_START_SECONDS = 5.0
PUBLISH_SECONDS = 5.0  # how often a worker adds its dropped log lines to the shared counter
DROPPED_HELP = "Log lines dropped because stderr was read too slowly (or failed)."

# The directory of the workers' files, in a worker of `serve --workers N` (N > 1); None in a
# single process. Process-wide, as the client's own choice of file-backed values is.
_shared_dir: str | None = None


def share_between_workers(directory: str) -> None:
    """This process is one of several workers: its metrics from now on are written to
    `directory` (the client's PROMETHEUS_MULTIPROC_DIR) and scraped summed over all."""
    global _shared_dir  # noqa: PLW0603 - one process, one choice
    _shared_dir = directory


class Exposing(Protocol):
    def exposition(self, accept: str | None) -> tuple[bytes, str]: ...


class Metrics(Listener):
    """The app's metrics: hears the observers (events, Graph requests), counts the calls the
    request log reports, and reads the queue when scraped."""

    def __init__(
        self,
        *,
        tools: Iterable[str],
        codes: Iterable[str],
        projects: Iterable[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        # No `_created` series beside each counter and histogram: in the text format they are
        # families of their own, doubling the series Prometheus stores for no use here.
        # (The client's switch is process-wide; funnelgate's process is its own.)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # (not annotated)
        self.registry = CollectorRegistry()
        registry = self.registry
        self._calls = Counter(
            "funnelgate_calls_total",
            "HTTP requests answered, by route, tool, HTTP status and error code.",
            ("route", "tool", "status", "code"),
            registry=registry,
        )
        self._call_seconds = Histogram(
            "funnelgate_call_duration_seconds",
            "Time from a request's arrival to the end of its answer, by route.",
            ("route",),
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "funnelgate_calls_in_flight",
            "Project calls being processed ([server] max_in_flight bounds them).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._events = Counter(
            "funnelgate_events_total",
            "Events by outcome: accepted (passed every check), queued (written to the outbox), "
            "delivered (Meta took them), failed (for good), retried (an attempt failed "
            "transiently; they wait for the next one).",
            ("project", "outcome"),
            registry=registry,
        )
        self._failures = Counter(
            "funnelgate_events_failed_total",
            "Events failed for good, by error code.",
            ("project", "code"),
            registry=registry,
        )
        self._graph_requests = Counter(
            "funnelgate_graph_requests_total",
            "Requests to Meta's Graph API, by the retry table's verdict on the answer.",
            ("verdict",),
            registry=registry,
        )
        self._graph_seconds = Histogram(
            "funnelgate_graph_request_duration_seconds",
            "Time of one Graph API request, connect to last byte (or to its timeout).",
            buckets=GRAPH_BUCKETS,
            registry=registry,
        )
        self.shared = _shared_dir
        self._scraped = _Scraped(clock, dropped=self.shared is None)
        registry.register(self._scraped)
        self._exposed = registry
        if self.shared is not None:
            # Summed from every worker's files; the queue read here, from the database.
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, path=self.shared)  # type: ignore[no-untyped-call]
            self._exposed.register(self._scraped)
            self._dropped = Counter("funnelgate_log_lines_dropped", DROPPED_HELP, registry=registry)
            self._dropped_published = 0
            self._publishing = threading.Lock()
        self._tools = frozenset(tools)
        self._codes = frozenset(codes)
        self._projects = frozenset(projects)
        self._call_children: dict[tuple[object, str, int, str], tuple[Counter, Histogram]] = {}
        self._event_children: dict[tuple[str, str], Counter] = {}
        self._failure_children: dict[tuple[str, str], Counter] = {}
        self._verdict_children: dict[str, Counter] = {}
        # Every project's outcomes and every verdict from the start, at 0: a series that
        # appears only with its first event makes rate() and alerts miss that event
        # (https://prometheus.io/docs/practices/instrumentation/#avoid-missing-metrics).
        for project_id in self._projects:
            for outcome in OUTCOMES:
                self._event(project_id, outcome)
        for verdict in sorted(VERDICTS):
            self._verdict(verdict)

    # --- calls (server/app.py's RequestLog) --------------------------------------------------

    def call(
        self, endpoint: object, tool: str | None, status: int, code: str | None, seconds: float
    ) -> None:
        """One answered request. `tool` is caller text: only a catalog name is kept."""
        tool_label = "" if tool is None else tool if tool in self._tools else OTHER
        code_label = "" if code is None else code if code in self._codes else OTHER
        key = (endpoint, tool_label, status, code_label)
        children = self._call_children.get(key)
        if children is None:
            children = self._call_children[key] = self._new_call_children(key)
        counter, histogram = children
        counter.inc()
        histogram.observe(seconds)

    def _new_call_children(self, key: tuple[object, str, int, str]) -> tuple[Counter, Histogram]:
        endpoint, tool, status, code = key
        route = UNMATCHED if endpoint is None else getattr(endpoint, "__name__", OTHER)
        return (
            self._calls.labels(route=route, tool=tool, status=str(status), code=code),
            self._call_seconds.labels(route=route),
        )

    # --- events and Graph requests (server/observe.py) ---------------------------------------

    def accepted(self, project_id: str, batch: EventBatch) -> None:
        self._event(project_id, "accepted").inc(len(batch.events))

    def queued(self, project_id: str, pixel_id: str, count: int) -> None:
        self._event(project_id, "queued").inc(count)

    def delivered(self, project_id: str, pixel_id: str, names: Sequence[str]) -> None:
        self._event(project_id, "delivered").inc(len(names))

    def failed(self, project_id: str, pixel_id: str, names: Sequence[str], code: str) -> None:
        self._event(project_id, "failed").inc(len(names))
        key = (project_id, code)
        child = self._failure_children.get(key)
        if child is None:
            child = self._failure_children[key] = self._failures.labels(
                project=self._project(project_id), code=code if code in self._codes else OTHER
            )
        child.inc(len(names))

    def retried(self, project_id: str, pixel_id: str, count: int) -> None:
        self._event(project_id, "retried").inc(count)

    def graph_request(self, verdict: str, seconds: float) -> None:
        self._verdict(verdict).inc()
        self._graph_seconds.observe(seconds)

    def _verdict(self, verdict: str) -> Counter:
        child = self._verdict_children.get(verdict)
        if child is None:
            label = verdict if verdict in VERDICTS else OTHER
            child = self._verdict_children[verdict] = self._graph_requests.labels(verdict=label)
        return child

    def _event(self, project_id: str, outcome: str) -> Counter:
        key = (project_id, outcome)
        child = self._event_children.get(key)
        if child is None:
            child = self._event_children[key] = self._events.labels(
                project=self._project(project_id), outcome=outcome
            )
        return child

    def _project(self, project_id: str) -> str:
        return project_id if project_id in self._projects else OTHER

    # --- the queue, read when scraped ---------------------------------------------------------

    def watch(self, database: Database) -> None:
        """Read the queue gauges from `database` (on a connection of their own) from now on."""
        self._scraped.open(database)

    def unwatch(self) -> None:
        self._scraped.close()

    def publish_dropped(self) -> None:
        """A worker's log lines dropped since it last said, added to the shared counter."""
        if self.shared is None:
            return
        with self._publishing:
            dropped = logs.dropped_lines()
            if dropped > self._dropped_published:
                self._dropped.inc(dropped - self._dropped_published)
                self._dropped_published = dropped

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The text the scrape gets, in the format its `Accept` asks for (Prometheus' text
        format, or OpenMetrics), and its content type. Reads the database (and, in a worker,
        the workers' files): not on the loop."""
        self.publish_dropped()
        return _encoded(self._exposed, accept)


def _encoded(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class WorkerTotals:
    """What the supervisor of several workers serves on `[metrics] port`: the workers' files
    summed, and the queue read from the database."""

    def __init__(self, directory: str, clock: Callable[[], float] = time.time) -> None:
        self._scraped = _Scraped(clock, dropped=False)
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]
        self.registry.register(self._scraped)

    def watch(self, database: Database) -> None:
        self._scraped.open(database)

    def unwatch(self) -> None:
        self._scraped.close()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        return _encoded(self.registry, accept)


class _Scraped(Collector):
    """The values read at scrape time: the queue from the outbox's partial indexes (never a
    table scan; outbox.gauges), and the log lines dropped so far."""

    def __init__(self, clock: Callable[[], float], *, dropped: bool) -> None:
        self._clock = clock
        self._dropped = dropped  # this process's count (else it is in the workers' files)
        self._lock = threading.Lock()  # one scrape at a time on the connection
        self._db: sqlite3.Connection | None = None
        self._read: Callable[[Callable[[Connection], Gauges]], Gauges] | None = None

    def open(self, database: Database) -> None:
        with self._lock:
            if isinstance(database, SqliteDatabase):
                self._db = db = connect(database.path)
                self._read = lambda job: job(db)
            else:  # PostgreSQL: its pooled readers are safe in any thread
                self._read = database.read_now

    def close(self) -> None:
        with self._lock:
            self._read = None
            if self._db is not None:
                self._db.close()
                self._db = None

    def collect(self) -> Iterator[Metric]:
        if self._dropped:
            yield CounterMetricFamily(
                "funnelgate_log_lines_dropped_total", DROPPED_HELP, value=logs.dropped_lines()
            )
        with self._lock:
            if self._read is None:
                return
            try:
                queued, held, failed, oldest = self._read(outbox.gauges)
            except ERRORS as exc:  # a scrape without the queue, not a failed scrape
                logs.log("metrics_queue_unread", logging.ERROR, error=type(exc).__name__)
                return
        queue = GaugeMetricFamily(
            "funnelgate_queue_events",
            "Events in the outbox waiting for delivery: queued (due now or after a backoff) and "
            "held (their credential was refused; they wait for a new token).",
            labels=("status",),
        )
        queue.add_metric(("queued",), queued)
        queue.add_metric(("held",), held)
        yield queue
        age = 0.0 if oldest is None else max(0.0, self._clock() - oldest)
        yield GaugeMetricFamily(
            "funnelgate_queue_oldest_age_seconds",
            "How long ago the oldest queued or held event was accepted; 0 when none waits.",
            value=age,
        )
        yield GaugeMetricFamily(
            "funnelgate_dead_letter_events",
            "Failed events kept in the outbox (replayable until [storage] retention_days).",
            value=failed,
        )


@asynccontextmanager
async def serving_metrics(
    counts: Metrics | None, settings: MetricsSettings, database: Database
) -> AsyncIterator[None]:
    """While the app runs (its lifespan): the queue gauges read from `database`, and the
    metrics port when `settings` names one (a worker's supervisor serves it instead); in a
    worker, its dropped log lines published now and then."""
    if counts is None:
        yield
        return
    counts.watch(database)
    port = None
    publisher = None
    try:
        if settings.port is not None and counts.shared is None:
            port = MetricsPort(counts, host=settings.host, port=settings.port, path=settings.path)
            await port.start()
        if counts.shared is not None:
            publisher = asyncio.create_task(_publish_dropped(counts))
        yield
    finally:
        if publisher is not None:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            counts.publish_dropped()
        if port is not None:
            await asyncio.to_thread(port.stop)
        counts.unwatch()


async def _publish_dropped(counts: Metrics) -> None:
    while True:
        await asyncio.sleep(PUBLISH_SECONDS)
        counts.publish_dropped()


async def metrics(request: Request) -> Response:
    """GET /metrics (or `[metrics] path`); the function's name is the route's label."""
    counts: Exposing = request.app.state.metrics
    body, content_type = await asyncio.to_thread(counts.exposition, request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


class MetricsPort:
    """`[metrics] port`: the metrics on a listener of their own, which answers `GET path` only.

    uvicorn in a thread, on an event loop of its own (scrapes never wait on the server's), at
    most PORT_CONCURRENCY requests at once; started and stopped with the app. The socket is
    bound here first, so a port in use stops start-up with the reason.
    """

    def __init__(self, counts: Exposing, *, host: str, port: int, path: str) -> None:
        app = Starlette(routes=[Route(path, metrics, methods=["GET"])])
        app.state.metrics = counts
        self._address = (host, port)
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                lifespan="off",
                log_config=None,  # funnelgate's logging stays as configured
                access_log=False,
                server_header=False,
                limit_concurrency=PORT_CONCURRENCY,
                timeout_graceful_shutdown=1,
            )
        )
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        host, port = self._address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._socket = socket.create_server((host, port), family=family)
        except OSError as exc:
            logs.log("metrics_port_failed", logging.ERROR, host=host, port=port,
                     error=exc.strerror or type(exc).__name__)  # fmt: skip
            raise
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="funnelgate-metrics",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + PORT_START_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the metrics listener on {host}:{port} did not start")
            await asyncio.sleep(0.01)
        logs.log("metrics_listening", host=host, port=port)

    def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
