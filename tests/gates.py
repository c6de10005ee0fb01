"""Real `funnelgate serve` processes for the fault tests, and the callers that load them.

A `Gate` is one `funnelgate serve` on its own config file, delivering to the fault Graph
(tests/faultgraph.py), on a SQLite file or on a PostgreSQL database several Gates share. The
callers post Run Tool calls over loopback with httpx, every wait bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.faultgraph import FaultGraph
from tests.support import config_toml, free_port, funnel_parameters, public_pem, wait_ready

PROJECT = "durable-project"
ACCESS_TOKEN = "EAAB-durable-token"
PIXELS = ("123456789012345", "223456789012345")
FUNNELGATE = Path(sys.executable).parent / "funnelgate"


class Gate:
    """`funnelgate serve` on one config and database, started (and restarted) by the test.

    `storage` is the config's [storage] table (default: a SQLite file beside the config);
    with a PostgreSQL `url`, several Gates on that URL are instances of one deployment."""

    def __init__(
        self,
        root: Path,
        key: Any,
        graph: FaultGraph,
        *,
        delivery: Mapping[str, Any],
        server: Mapping[str, Any] | None = None,
        graph_settings: Mapping[str, Any] | None = None,
        storage: Mapping[str, Any] | None = None,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "project.pub.pem").write_text(public_pem(key))
        storage = dict(storage or {"url": "sqlite:///funnelgate.db"})
        tables = {
            "graph": {"base_url": graph.base_url, **(graph_settings or {})},
            "delivery": dict(delivery),
            "storage": storage,
            "server": dict(server or {}),
        }
        self.config = root / "config.toml"
        self.config.write_text(config_toml(tables, project=PROJECT, access_token=ACCESS_TOKEN))
        url = str(storage["url"])
        self.database_url = url if url.startswith("postgresql://") else None
        self.database = root / "funnelgate.db"
        self.log = root / "funnelgate.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FUNNELGATE_")}

    def spawn(self) -> None:
        """Starts the process; `wait_ready` waits until it answers."""
        assert self.process is None or self.process.poll() is not None
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(FUNNELGATE), "serve", "--config", str(self.config), "--host", "127.0.0.1",
                 "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )  # fmt: skip

    def wait_ready(self) -> None:
        assert self.process is not None
        wait_ready(self.base, self.process)

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, *, within: float) -> float:
        """SIGTERM; the seconds until the process was gone (it is killed past `within`)."""
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
            self.terminate(within=15)

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(FUNNELGATE), *args, "--config", str(self.config)],
            capture_output=True, text=True, timeout=60, env=self.env, input=stdin,
        )  # fmt: skip

    def event(self, token: str, event_id: str) -> dict[str, Any]:
        """GET /projects/{id}/events/{event_id}: the event's status (asserts a 200)."""
        answer = httpx.get(
            f"{self.base}/projects/{PROJECT}/events/{event_id}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert answer.status_code == 200, (event_id, answer.status_code, answer.text)
        result: dict[str, Any] = answer.json()
        return result

    def log_lines(self, event: str) -> int:
        """How many log lines of this event the server has written so far."""
        marker = f'"event":"{event}"'
        return sum(marker in line for line in self.log.read_text(errors="replace").splitlines())

    def log_tail(self, lines: int = 20) -> str:
        """The server's last log lines, less the per-request ones (for failure messages)."""
        kept = [line for line in self.log.read_text(errors="replace").splitlines()
                if '"event":"request"' not in line]  # fmt: skip
        return "\n".join(kept[-lines:])

    def outbox_rows(self, event_ids: Sequence[str]) -> dict[str, int]:
        """For a failure message: how the outbox holds these events, by status (read only)."""
        try:
            rows = self._outbox()
        except (sqlite3.Error, psycopg.Error) as exc:
            return {f"unreadable: {exc}": 0}
        wanted = set(event_ids)
        counts: dict[str, int] = {}
        now = time.time()
        for event_id, status, next_at in rows:
            if event_id in wanted:
                due = "due" if next_at <= now else f"due in {next_at - now:.0f} s"
                label = f"{status} ({due})" if status == "queued" else status
                counts[label] = counts.get(label, 0) + 1
        counts["not in the outbox"] = len(wanted) - sum(counts.values())
        return counts

    def _outbox(self) -> list[tuple[str, str, float]]:
        query = "SELECT event_id, status, next_at FROM outbox WHERE project_id = "
        if self.database_url is not None:
            with psycopg.connect(self.database_url, connect_timeout=5) as pg:
                return pg.execute(query + "%s", (PROJECT,)).fetchall()
        db = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(query + "?", (PROJECT,)).fetchall()
        finally:
            db.close()

    def pending(self) -> dict[str, int]:
        """The outbox's rows by status (PostgreSQL), every project's."""
        assert self.database_url is not None
        with psycopg.connect(self.database_url, connect_timeout=5) as pg:
            rows = pg.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall()
        return {str(status): int(count) for status, count in rows}

    def leased(self) -> int:
        """Queued rows under a claim now (PostgreSQL): a claim moves `next_at` to its lease's
        end (storage/outbox.py)."""
        assert self.database_url is not None
        with psycopg.connect(self.database_url, connect_timeout=5) as pg:
            query = "SELECT count(*) FROM outbox WHERE status = 'queued' AND next_at > %s"
            row = pg.execute(query, (time.time(),)).fetchone()
        return 0 if row is None else int(row[0])


def stop_all(gates: Sequence[Gate]) -> None:
    """Stops every Gate, even when one of them fails to stop."""
    with contextlib.ExitStack() as stack:
        for gate in gates:
            stack.callback(gate.stop)


# The callers


def capi_event(event_id: str) -> dict[str, Any]:
    """A website Purchase in CAPI's own names, timed now, with raw customer data to hash."""
    return {
        "event_name": "Purchase",
        "event_time": int(time.time()) - 30,
        "event_id": event_id,
        "action_source": "website",
        "event_source_url": "https://shop.example.com/thanks",
        "user_data": {
            "em": f"{event_id}@example.com",
            "external_id": event_id,
            "client_user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
        },
        "custom_data": {"value": 12.5, "currency": "EUR"},
    }


def batch_call(event_ids: Sequence[str], pixel: str = PIXELS[0]) -> dict[str, Any]:
    events = [capi_event(event_id) for event_id in event_ids]
    return {"tool": "FACEBOOK_ADS_SEND_EVENTS", "parameters": {"pixel_id": pixel, "events": events}}


def single_call(event_id: str) -> dict[str, Any]:
    parameters = funnel_parameters(eventTime=None, eventId=event_id, pixel=PIXELS[0],
                                   customerEmail=f"{event_id}@example.com")  # fmt: skip
    return {"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": parameters}


@dataclass
class Outcome:
    """One call's answer; status None when it got none (connection refused or cut)."""

    event_ids: list[str]
    status: int | None
    body: Any
    seconds: float
    headers: httpx.Headers | None = None
    base: str = ""  # the server it went to
    sent_at: float = 0.0  # wall clock


Target = str | Callable[[int], str]  # a base URL, or the base URL of the i-th call


async def post_all_async(
    base: Target,
    token: str,
    calls: Sequence[tuple[list[str], dict[str, Any]]],
    *,
    concurrency: int,
    spacing: float = 0.0,
    headers: Mapping[str, str] | None = None,
    after: Callable[[Outcome], None] | None = None,
    timeout: float = 20.0,
) -> list[Outcome]:
    """POSTs each (event ids, body) to Run Tool, `concurrency` at a time, the i-th not before
    i * `spacing` seconds, to `base` (or `base(i)`); `after` sees each outcome as it comes."""
    outcomes: list[Outcome] = []
    indices = iter(range(len(calls)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent_headers = {"Authorization": f"Bearer {token}", **(headers or {})}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            for index in indices:
                await asyncio.sleep(max(0.0, started + index * spacing - loop.time()))
                event_ids, body = calls[index]
                where = base(index) if callable(base) else base
                sent, sent_at = loop.time(), time.time()
                try:
                    answer = await client.post(
                        f"{where}/projects/{PROJECT}/tools", json=body, headers=sent_headers
                    )
                    outcome = Outcome(event_ids, answer.status_code, answer.json(),
                                      loop.time() - sent, answer.headers, where, sent_at)  # fmt: skip
                except httpx.TransportError:
                    outcome = Outcome(event_ids, None, None, loop.time() - sent, None, where,
                                      sent_at)  # fmt: skip
                outcomes.append(outcome)
                if after is not None:
                    after(outcome)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def post_all(
    base: Target,
    token: str,
    calls: Sequence[tuple[list[str], dict[str, Any]]],
    **options: Any,
) -> list[Outcome]:
    return asyncio.run(post_all_async(base, token, calls, **options))


def accepted_ids(outcomes: Sequence[Outcome]) -> set[str]:
    """The events of every call answered 200 or 202: funnelgate owns their delivery."""
    return {e for o in outcomes if o.status in (200, 202) for e in o.event_ids}


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def assert_delivered(graph: FaultGraph, gate: Gate, event_ids: set[str], seconds: float) -> None:
    missing = graph.wait_for(event_ids, seconds=seconds)
    assert not missing, (
        f"{len(missing)} of {len(event_ids)} accepted events not delivered in {seconds:g} s; "
        f"outbox: {gate.outbox_rows(sorted(missing))}; Graph: {graph.stats()}\n{gate.log_tail()}"
    )
