"""`funnelgate serve --workers 2` as a real process tree on 127.0.0.1, with the fault Graph
(tests/faultgraph.py) as Meta: both workers answer calls, `/metrics` on either shows the sum
of both, a console login made on one holds on the other, a worker killed is replaced, and
SIGTERM to the supervisor stops every worker within the shutdown budget, losing no event.

Which worker answers is the kernel's choice (each accepts on the shared socket), so the tests
make new connections until both have answered; a worker is known by its pid, as the metrics
files in its supervisor's directory name it (`counter_<pid>.db`), never by anything a
response carries.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from server.cli import main
from tests.faultgraph import FaultGraph
from tests.support import (
    config_toml,
    free_port,
    funnel_parameters,
    public_pem,
    rsa_private_key,
    sign_token,
    wait_ready,
)

pytestmark = pytest.mark.timeout(120)

PROJECT = "workers-project"
USER = "user-1"
ACCESS_TOKEN = "EAAB-workers-token"
PIXEL = "123456789012345"
CONSOLE_TOKEN = "workers-console-admin-token-5e0b7a"
FUNNELGATE = Path(sys.executable).parent / "funnelgate"
SHUTDOWN_SECONDS = 4  # [server] shutdown_seconds of every server here
RUN_TOOL = f"/projects/{PROJECT}/tools"
ROUNDS = 10  # rounds of new connections until both workers have answered (each a few calls)


class Workers:
    """`funnelgate serve --workers N` on its own config and database, stopped at the end."""

    def __init__(
        self, root: Path, key: Any, graph: FaultGraph, storage_url: str | None = None,
        **delivery: Any,
    ) -> None:  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        (root / "project.pub.pem").write_text(public_pem(key))
        digest = hashlib.sha256(CONSOLE_TOKEN.encode()).hexdigest()
        tables = {
            "graph": {"base_url": graph.base_url},
            "delivery": delivery,
            "storage": {"url": storage_url or "sqlite:///funnelgate.db"},
            "server": {"shutdown_seconds": SHUTDOWN_SECONDS},
            "console": {"token_sha256": digest},
        }
        self.config = root / "config.toml"
        self.config.write_text(config_toml(tables, project=PROJECT, access_token=ACCESS_TOKEN))
        self.database = root / "funnelgate.db"
        self.log = root / "funnelgate.log"
        self.tmp = root / "tmp"  # the server's TMPDIR: its metrics directory is made there
        self.tmp.mkdir()
        self.process: subprocess.Popen[bytes] | None = None
        self.base = ""

    def start(self, count: int = 2) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUNNELGATE_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(FUNNELGATE), "serve", "--config", str(self.config), "--host", "127.0.0.1",
                 "--port", str(port), "--workers", str(count)],
                stdout=log, stderr=subprocess.STDOUT, env={**env, "TMPDIR": str(self.tmp)},
            )  # fmt: skip
        wait_ready(self.base, self.process)
        assert wait_until(lambda: len(self.worker_pids()) == count, 20), self.log_tail()

    def metrics_dir(self) -> Path:
        [directory] = self.tmp.glob("funnelgate-metrics-*")
        return directory

    def worker_pids(self) -> set[int]:
        """The live workers: each writes its counters to counter_<pid>.db from its start."""
        pids = {int(p.stem.split("_")[1]) for p in self.metrics_dir().glob("counter_*.db")}
        return {pid for pid in pids if alive(pid)}

    def answered(self, route: str, status: int | None = None) -> dict[int, float]:
        """Per worker pid, the requests it counted for `route` (and `status`)."""
        counts: dict[int, float] = {}
        for path in self.metrics_dir().glob("counter_*.db"):
            pid = int(path.stem.split("_")[1])
            merged = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
            for metric in merged:
                for sample in metric.samples:
                    if (
                        sample.name == "funnelgate_calls_total"
                        and sample.labels["route"] == route
                        and (status is None or sample.labels["status"] == str(status))
                    ):
                        counts[pid] = counts.get(pid, 0.0) + sample.value
        return counts

    def terminate(self, *, within: float) -> float:
        """SIGTERM to the supervisor alone (as an orchestrator sends it); the seconds until it
        was gone (killed past `within`)."""
        assert self.process is not None
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        return time.monotonic() - sent

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate(within=SHUTDOWN_SECONDS + 10)

    def log_tail(self, lines: int = 30) -> str:
        kept = [line for line in self.log.read_text(errors="replace").splitlines()
                if '"event":"request"' not in line]  # fmt: skip
        return "\n".join(kept[-lines:])

    def outbox(self) -> dict[str, str]:
        """Each event id's newest status (read only, once the server is gone or running)."""
        db = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute(
                "SELECT event_id, status FROM outbox WHERE project_id = ? ORDER BY seq", (PROJECT,)
            ).fetchall()
        finally:
            db.close()
        return {event_id: status for event_id, status in rows}


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def fresh(base: str, **options: Any) -> httpx.Client:
    """A client that opens a new connection for every request: each is the kernel's to give
    to either worker."""
    limits = httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(base_url=base, timeout=20, limits=limits, **options)


def at_once(request: Callable[[], httpx.Response], count: int = 4) -> list[httpx.Response]:
    """`count` requests at once (each on a new connection): both workers take some."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: request(), range(count)))


def capi_event(event_id: str) -> dict[str, Any]:
    return {
        "event_name": "Purchase",
        "event_time": int(time.time()) - 30,
        "event_id": event_id,
        "action_source": "website",
        "event_source_url": "https://shop.example.com/thanks",
        "user_data": {"em": f"{event_id}@example.com", "client_user_agent": "Mozilla/5.0"},
        "custom_data": {"value": 12.5, "currency": "EUR"},
    }


def batch_call(event_ids: Sequence[str]) -> dict[str, Any]:
    events = [capi_event(event_id) for event_id in event_ids]
    return {"tool": "FACEBOOK_ADS_SEND_EVENTS", "parameters": {"pixel_id": PIXEL, "events": events}}


def single_call(event_id: str) -> dict[str, Any]:
    parameters = funnel_parameters(eventTime=None, eventId=event_id, pixel=PIXEL,
                                   customerEmail=f"{event_id}@example.com")  # fmt: skip
    return {"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": parameters}


def post_all(
    base: str, token: str, calls: Sequence[tuple[dict[str, Any], dict[str, str]]]
) -> list[int]:
    """Each (body, headers) posted to Run Tool, 8 at a time, each on a new connection."""
    auth = {"Authorization": f"Bearer {token}"}
    with fresh(base) as client, ThreadPoolExecutor(8) as pool:
        answers = pool.map(
            lambda call: client.post(RUN_TOOL, json=call[0], headers={**auth, **call[1]}), calls
        )
        return [answer.status_code for answer in answers]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrapes(base: str, count: int = 4) -> list[Samples]:
    """`count` scrapes at once, each on a new connection (at once: both workers take some)."""
    with fresh(base) as client, ThreadPoolExecutor(count) as pool:
        texts = list(pool.map(lambda _: client.get("/metrics").text, range(count)))
    return [
        {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        for text in texts
    ]


def total(found: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and wanted <= ls)


@pytest.fixture(scope="module")
def key() -> Any:
    return rsa_private_key()


@pytest.fixture(scope="module")
def token(key: Any) -> str:
    return sign_token(key, USER, now=time.time(), ttl=3600, aud=f"useparagon.com/{PROJECT}")


@pytest.fixture(scope="module")
def graph() -> Iterator[FaultGraph]:
    with FaultGraph() as fault_graph:
        yield fault_graph


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, key: Any, graph: FaultGraph) -> Iterator[Workers]:
    """Two workers in sync mode (Meta answers at once), shared by the tests that only call."""
    workers = Workers(tmp_path_factory.mktemp("two"), key, graph)
    try:
        workers.start()
        yield workers
    finally:
        workers.stop()


ids = (f"w-{n}" for n in itertools.count())


def test_both_workers_answer_and_metrics_on_either_count_both(two: Workers, graph, token):
    queued = {"Prefer": "respond-async"}
    sync_calls = queued_calls = 0
    sent: set[str] = set()
    for _ in range(ROUNDS):
        batch = [next(ids) for _ in range(5)]
        singles = [next(ids) for _ in range(8)]
        calls = [(batch_call(batch), queued)] + [
            (single_call(event_id), {}) if n % 2 else (batch_call([event_id]), queued)
            for n, event_id in enumerate(singles)
        ]
        statuses = post_all(two.base, token, calls)
        assert statuses == [202] + [200 if n % 2 else 202 for n in range(8)], statuses
        sync_calls += 4
        queued_calls += 5
        sent |= {*batch, *singles}
        if len(two.answered("run_tool")) == 2:
            break
    per_worker = two.answered("run_tool")
    assert sorted(per_worker) == sorted(two.worker_pids()), per_worker  # both answered
    assert sum(per_worker.values()) == sync_calls + queued_calls
    assert not graph.wait_for(sent, seconds=30), two.log_tail()
    # Any worker's scrape shows the sum over both; delivered counts settle as the
    # dispatchers (one in each worker) report. Several scrapes: both workers answer some.
    expected = {
        ("funnelgate_calls_total", "200"): sync_calls,
        ("funnelgate_calls_total", "202"): queued_calls,
    }

    def settled(found: Samples) -> bool:
        return (
            all(total(found, name, route="run_tool", status=status) == count
                for (name, status), count in expected.items())
            and total(found, "funnelgate_events_total", outcome="accepted") == len(sent)
            and total(found, "funnelgate_events_total", outcome="delivered") == len(sent)
            and total(found, "funnelgate_events_total", outcome="queued") == queued_calls + 4
            and total(found, "funnelgate_calls_in_flight") == 0
            and total(found, "funnelgate_queue_events") == 0  # from the database, not summed
        )  # fmt: skip

    assert wait_until(lambda: all(map(settled, scrapes(two.base))), 15), scrapes(two.base, 1)
    for _ in range(ROUNDS):
        found = scrapes(two.base)
        assert all(map(settled, found)), found
        if len(two.answered("metrics")) == 2:
            break
    assert len(two.answered("metrics")) == 2  # the scrapes, too, reached both


def test_two_workers_on_postgresql_share_one_database(
    tmp_path: Path, key, graph: FaultGraph, token, postgres_url: str
):
    """The same supervisor on PostgreSQL: it upgrades the schema before the workers start,
    both workers answer and deliver, and the queue every scrape shows is the database's."""
    workers = Workers(tmp_path / "pg", key, graph, storage_url=postgres_url)
    try:
        workers.start()
        sent: set[str] = set()
        for _ in range(ROUNDS):
            batch = [next(ids) for _ in range(6)]
            calls = [(batch_call([event_id]), {"Prefer": "respond-async"}) for event_id in batch]
            assert post_all(workers.base, token, calls) == [202] * 6
            sent |= set(batch)
            if len(workers.answered("run_tool")) == 2:
                break
        assert len(workers.answered("run_tool")) == 2, workers.log_tail()
        assert not graph.wait_for(sent, seconds=30), workers.log_tail()
        assert wait_until(
            lambda: all(
                total(found, "funnelgate_queue_events") == 0
                and total(found, "funnelgate_events_total", outcome="delivered") == len(sent)
                for found in scrapes(workers.base)
            ),
            15,
        ), scrapes(workers.base, 1)
        assert not (tmp_path / "pg" / "funnelgate.db").exists()  # nothing went to a file
    finally:
        workers.stop()


def test_a_console_login_on_one_worker_holds_on_the_other(two: Workers):
    with fresh(two.base) as client:
        login = client.post("/console/login", data={"token": CONSOLE_TOKEN, "next": "/console"})
        assert (login.status_code, login.headers["location"]) == (303, "/console"), login.text
        pages: list[httpx.Response] = []
        for _ in range(ROUNDS):
            pages += at_once(lambda: client.get("/console", follow_redirects=False))
            if len(two.answered("console_overview", 200)) == 2:
                break
        assert [page.status_code for page in pages] == [200] * len(pages)
        assert len(two.answered("console_overview", 200)) == 2  # both served the session
        csrf = re.search(r'name="csrf" value="([^"]+)"', pages[-1].text)
        assert csrf is not None
        cookie = client.cookies["funnelgate_console"]
        out = client.post("/console/logout", data={"csrf": csrf[1]}, follow_redirects=False)
        assert out.status_code == 303
    # The old cookie, replayed after the logout: refused by every worker.
    with fresh(two.base, cookies={"funnelgate_console": cookie}) as replayed:
        for _ in range(ROUNDS):
            for refused in at_once(lambda: replayed.get("/console", follow_redirects=False)):
                assert refused.status_code == 303, refused.text[:200]
            if len(two.answered("console_overview", 303)) == 2:
                break
    assert len(two.answered("console_overview", 303)) == 2


def test_a_killed_worker_is_replaced_and_sigterm_stops_all_losing_nothing(
    tmp_path: Path, key: Any, graph: FaultGraph, token: str
):
    """kill -9 of a worker: a new one takes its place. Then a queued backlog with a slow Meta,
    and SIGTERM to the supervisor: every worker stops within the budget, and every event
    answered 202 is delivered or still queued in the database."""
    graph.reset()
    workers = Workers(tmp_path, key, graph, mode="queued")
    try:
        workers.start()
        first = workers.worker_pids()
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(workers.worker_pids() - {victim}) == 2, 30), (
            workers.log_tail()
        )
        assert wait_until(lambda: '"event":"worker_replaced"' in workers.log.read_text(), 10)
        graph.control(latency=[1.0, 3.0])
        batches = [[f"t-{n}-{i}" for i in range(100)] for n in range(30)]
        statuses = post_all(workers.base, token, [(batch_call(b), {}) for b in batches])
        assert statuses == [202] * len(batches)
        pids = workers.worker_pids()
        seconds = workers.terminate(within=SHUTDOWN_SECONDS + 10)
        assert seconds <= SHUTDOWN_SECONDS + 3, (seconds, workers.log_tail())
        assert workers.process is not None and workers.process.returncode == 0
        assert not [pid for pid in pids if alive(pid)]
        assert not list(workers.tmp.iterdir())  # the metrics directory went with it
    finally:
        workers.stop()
    accepted = {event_id for batch in batches for event_id in batch}
    delivered = graph.copies().keys()
    rows = workers.outbox()
    lost = {e for e in accepted if e not in delivered and rows.get(e) != "queued"}
    assert not lost, (len(lost), sorted(lost)[:5], workers.log_tail())
    assert {e for e, status in rows.items() if status == "delivered"} <= delivered
    assert set(rows.values()) <= {"queued", "delivered"}


@pytest.mark.parametrize("value", ["0", "65", "-1", "two", ""])
def test_a_worker_count_out_of_range_is_refused(value: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--workers", value])
    assert exited.value.code == 2
    assert "--workers: a whole number from 1 to 64" in capsys.readouterr().err


def test_a_start_up_failure_is_reported_once_before_any_worker(
    tmp_path: Path, key: Any, graph: FaultGraph
):
    workers = Workers(tmp_path, key, graph)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(FUNNELGATE), "serve", "--config", str(workers.config), "--port", str(port),
             "--workers", "2"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "TMPDIR": str(workers.tmp)},
        )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("Address already in use") == 1, result.stderr
    assert "Started server process" not in result.stderr  # no worker was started
    assert not list(workers.tmp.iterdir())
