"""PostgreSQL clients for the outbox's hot statements: asyncpg, psycopg 3's AsyncConnection,
and psycopg 3's sync Connection owned by a worker thread and awaited through a future (the
shape of funnelgate's group-commit writer, server/storage/writer.py).

A throwaway PostgreSQL (the `pgserver` wheel) runs in a temporary directory, over its unix
socket, and is stopped at the end, even on error. Every round runs each client's every way of
doing a statement once, the order rotating from round to round, so slow drift of the machine
(other work, the table's growth) falls on all clients alike; the table shows medians over the
rounds, with the slowest and fastest round. CPU is the benchmark process's (time.process_time:
the event loop and the worker threads) and the server's (every PostgreSQL process, ServerCpu).

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/pg_drivers.py [--rounds N] [--quick] [--loop uvloop|asyncio]
        [--synchronous-commit on|off] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psutil
import psycopg
import psycopg_pool
from benchlib import table

T = TypeVar("T")
Row = tuple[Any, ...]  # an outbox row's values, in INSERT order (server/storage/outbox.py)

QUEUE_ROWS = 50_000  # queued rows in the table when claims run
CLAIM_LIMIT = 1_000
TASKS = 16  # concurrent single-event enqueues: the queued Run Tool's shape
MAX_JOBS_PER_COMMIT = 512  # as server/storage/writer.py

SCHEMA = """
CREATE TABLE outbox (
  seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  project_id text NOT NULL, user_id text NOT NULL, event_id text NOT NULL,
  event_name text NOT NULL, pixel_id text NOT NULL, test_event_code text,
  expires_at double precision NOT NULL, status text NOT NULL, attempts integer NOT NULL,
  next_at double precision NOT NULL, created_at double precision NOT NULL,
  updated_at double precision NOT NULL, fbtrace_id text, error bytea, event bytea NOT NULL,
  credential_id text);
CREATE INDEX outbox_due ON outbox (next_at) WHERE status = 'queued';
-- The benchmark vacuums between its runs itself: an autovacuum starting mid-run would be
-- noise on whichever client it fell.
ALTER TABLE outbox SET (autovacuum_enabled = false);
"""
# The staging table of the COPY ways: COPY cannot return the new seqs, an INSERT ... SELECT
# from it can. `ord` keeps the input order for RETURNING.
STAGING = """
CREATE TEMP TABLE outbox_in (
  ord bigint GENERATED ALWAYS AS IDENTITY, project_id text, user_id text, credential_id text,
  event_id text, event_name text, pixel_id text, test_event_code text, expires_at float8,
  attempts integer, next_at float8, created_at float8, updated_at float8, error bytea,
  event bytea) ON COMMIT DELETE ROWS
"""
INSERT_COLUMNS = (
    "project_id, user_id, credential_id, event_id, event_name, pixel_id, test_event_code, "
    "expires_at, status, attempts, next_at, created_at, updated_at, error, event"
)
ROW_COLUMNS = [c for c in INSERT_COLUMNS.split(", ") if c != "status"]
_SELECTED = (
    "project_id, user_id, credential_id, event_id, event_name, pixel_id, test_event_code, "
    "expires_at, 'queued', attempts, next_at, created_at, updated_at, error, event"
)
CLAIMED = (
    "seq, project_id, user_id, credential_id, event_id, event_name, pixel_id, test_event_code, "
    "expires_at, attempts, event"
)
STATUS = (
    "seq, project_id, user_id, event_id, event_name, pixel_id, status, attempts, next_at, "
    "created_at, updated_at, fbtrace_id, error, credential_id"
)
_ARRAY_TYPES = (
    "text[]", "text[]", "text[]", "text[]", "text[]", "text[]", "text[]", "float8[]",
    "integer[]", "float8[]", "float8[]", "float8[]", "bytea[]", "bytea[]",
)  # fmt: skip


def _unnest(marks: Sequence[str]) -> str:
    arrays = ", ".join(f"{m}::{t}" for m, t in zip(marks, _ARRAY_TYPES, strict=True))
    return (
        f"INSERT INTO outbox ({INSERT_COLUMNS}) SELECT {_SELECTED} "  # noqa: S608
        f"FROM unnest({arrays}) AS r({', '.join(ROW_COLUMNS)}) RETURNING seq"
    )


def _values(marks: Sequence[str]) -> str:
    values = ", ".join([*marks[:8], "'queued'", *marks[8:]])
    return f"INSERT INTO outbox ({INSERT_COLUMNS}) VALUES ({values}) RETURNING seq"  # noqa: S608


def _claim(now: str, lease: str, limit: str) -> str:
    return (
        f"UPDATE outbox SET next_at = {lease} WHERE seq IN (SELECT seq FROM outbox "  # noqa: S608
        f"WHERE status = 'queued' AND next_at <= {now} ORDER BY next_at LIMIT {limit} "
        f"FOR UPDATE SKIP LOCKED) RETURNING {CLAIMED}"
    )


def _settle(now: str, trace: str, seqs: str) -> str:
    return (
        f"UPDATE outbox SET status = 'delivered', attempts = attempts + 1, "  # noqa: S608
        f"updated_at = {now}, fbtrace_id = {trace}, error = NULL WHERE seq = ANY({seqs}::bigint[]) "
        "AND status IN ('queued', 'held')"
    )


_PG = ["%s"] * 14  # psycopg's placeholders
_AP = [f"${i}" for i in range(1, 15)]  # asyncpg's
PG_VALUES, AP_VALUES = _values(_PG), _values(_AP)
PG_UNNEST, AP_UNNEST = _unnest(_PG), _unnest(_AP)
# psycopg sends most parameters as text by default (%s); %b asks for its binary dumpers: the
# arrays then need no text parsing on the server, and bytea no hex.
PG_UNNEST_BINARY = _unnest(["%b"] * 14)
PG_CLAIM, AP_CLAIM = _claim("%s", "%s", "%s"), _claim("$2", "$1", "$3")
PG_SETTLE, AP_SETTLE = _settle("%s", "%s", "%s"), _settle("$1", "$2", "$3")
PG_READ = f"SELECT {STATUS} FROM outbox WHERE seq = %s"  # noqa: S608
AP_READ = f"SELECT {STATUS} FROM outbox WHERE seq = $1"  # noqa: S608
COPY_IN = f"COPY outbox_in ({', '.join(ROW_COLUMNS)}) FROM STDIN"
FROM_STAGING = (
    f"INSERT INTO outbox ({INSERT_COLUMNS}) SELECT {_SELECTED} FROM outbox_in "  # noqa: S608
    "ORDER BY ord RETURNING seq"
)


# --- the events: ~600 bytes of Conversions API JSON each, as the outbox stores them ----------
def event_body(i: int, now: float) -> bytes:
    h = f"{i:064x}"
    event = {
        "event_name": "Purchase",
        "event_time": int(now),
        "event_id": f"evt-{i}",
        "action_source": "website",
        "event_source_url": "https://shop.example.com/checkout/thank-you?order=" + str(i),
        "user_data": {
            "em": [h],
            "ph": [h[::-1]],
            "fn": [h[1:] + "a"],
            "ct": [h[2:] + "bc"],
            "client_ip_address": "203.0.113.7",
            "client_user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
            "fbp": f"fb.1.{int(now * 1000)}.{i}",
        },
        "custom_data": {"currency": "USD", "value": 42.5, "content_ids": [f"sku-{i % 97}"]},
    }
    return json.dumps(event, separators=(",", ":")).encode()


class Rows:
    """Fresh outbox rows (distinct event ids), made ahead of the timed code: the server has
    them as `rows_of` gives them before it calls the database."""

    def __init__(self) -> None:
        self._n = 0

    def take(self, count: int, now: float) -> list[Row]:
        rows = []
        for _ in range(count):
            self._n += 1
            i = self._n
            rows.append(
                (f"project-{i % 3}", f"user-{i % 11}", None, f"evt-{i}", "Purchase",
                 "123456789012345", None, now + 7 * 86400, 0, now, now, now, None,
                 event_body(i, now))
            )  # fmt: skip
        return rows


def columns(rows: Sequence[Row]) -> list[list[Any]]:
    return [list(c) for c in zip(*rows, strict=True)]


# --- psycopg's sync connection in a thread: the group-commit writer, and a reader ---------------
_Waiting = tuple[Callable[[psycopg.Connection[Any]], Any], asyncio.AbstractEventLoop, Any]


class ThreadConnection:
    """One thread owns one psycopg connection; `await run(job)` runs `job(connection)` there.

    With `group=True` it is the group-commit writer: the jobs waiting when the thread is free
    run in one transaction (BEGIN ... COMMIT), each in a SAVEPOINT when the batch holds more
    than one, so one failing job is rolled back alone (server/storage/writer.py also wraps a
    batch of one; its rollback is the transaction's, so that SAVEPOINT changes nothing).
    `savepoints = False`: none at all, two round trips fewer per job, and one failing job fails
    its batch. `pipeline = True`: the batch runs in libpq's pipeline mode, so BEGIN, SAVEPOINT
    and RELEASE travel with the job's next statement instead of waiting each for its reply
    (https://www.postgresql.org/docs/16/libpq-pipeline-mode.html). Without `group`, each job
    runs on its own, in autocommit (the reader).
    """

    def __init__(self, conninfo: str, *, group: bool, setup: str = "") -> None:
        self._db = psycopg.connect(conninfo, autocommit=True)
        if setup:
            self._db.execute(setup)
        self.group = group
        self.savepoints = True
        self.pipeline = False
        self.commits = 0
        self.jobs = 0
        self._queue: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="pg-thread", daemon=True)
        self._thread.start()

    def run(self, job: Callable[[psycopg.Connection[Any]], T]) -> Awaitable[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((job, loop, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._db.close()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while self.group and len(batch) < MAX_JOBS_PER_COMMIT:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Waiting]) -> None:
        db = self._db
        outcomes: list[tuple[Any, Any, BaseException | None]] = []
        if not self.group:
            for job, _, future in batch:
                try:
                    outcomes.append((future, job(db), None))
                except Exception as exc:
                    outcomes.append((future, None, exc))
        else:
            each = self.savepoints and len(batch) > 1
            try:
                with db.pipeline() if self.pipeline else contextlib.nullcontext() as pipe:
                    db.execute("BEGIN")
                    for job, _, future in batch:
                        if each:
                            db.execute("SAVEPOINT job")
                        try:
                            result = job(db)
                        except Exception as exc:
                            if not each:
                                raise
                            if pipe is not None:  # leave the aborted state the error left
                                pipe.sync()
                            db.execute("ROLLBACK TO job")
                            outcomes.append((future, None, exc))
                        else:
                            outcomes.append((future, result, None))
                        if each:
                            db.execute("RELEASE job")
                    db.execute("COMMIT")
                self.commits += 1
                self.jobs += len(batch)
            except Exception as exc:  # the whole batch failed
                with contextlib.suppress(psycopg.Error):
                    db.execute("ROLLBACK")
                outcomes = [(future, None, exc) for _, _, future in batch]
        loop = batch[0][1]
        loop.call_soon_threadsafe(_settle_all, outcomes)


def _settle_all(outcomes: list[tuple[Any, Any, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


# --- psycopg's statements, sync (for the thread) and async ---------------------------------------
def pg_enqueue(way: str, db: psycopg.Connection[Any], rows: Sequence[Row]) -> list[int]:
    """In the writer's transaction already: no BEGIN of its own."""
    with db.cursor() as cur:
        if way.startswith("unnest"):
            sql = PG_UNNEST_BINARY if way.endswith("%b") else PG_UNNEST
            return [r[0] for r in cur.execute(sql, columns(rows)).fetchall()]
        if way == "executemany":
            cur.executemany(PG_VALUES, rows, returning=True)
            seqs = []
            while True:
                seqs.append(cur.fetchone()[0])  # type: ignore[index]
                if not cur.nextset():
                    return seqs
        with cur.copy(COPY_IN) as copy:
            for row in rows:
                copy.write_row(row)
        return [r[0] for r in cur.execute(FROM_STAGING).fetchall()]


async def apg_enqueue(way: str, db: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> list[int]:
    """One statement runs alone, in autocommit (one round trip); several, in a transaction."""
    if way.startswith("unnest"):
        sql = PG_UNNEST_BINARY if way.endswith("%b") else PG_UNNEST
        cur = await db.execute(sql, columns(rows))
        return [r[0] for r in await cur.fetchall()]
    async with db.transaction(), db.cursor() as cur:
        if way == "executemany":
            await cur.executemany(PG_VALUES, rows, returning=True)
            seqs = []
            while True:
                seqs.append((await cur.fetchone())[0])  # type: ignore[index]
                if not cur.nextset():
                    return seqs
        async with cur.copy(COPY_IN) as copy:
            for row in rows:
                await copy.write_row(row)
        await cur.execute(FROM_STAGING)
        return [r[0] for r in await cur.fetchall()]


def _claim_args(now: float) -> tuple[float, float, int]:
    return (now + 300, now, CLAIM_LIMIT)


# --- the three clients ---------------------------------------------------------------------------
class Client:
    name = ""
    enqueue_ways: tuple[str, ...] = ()
    claim_ways: tuple[str, ...] = ()
    concurrent_ways: tuple[str, ...] = ()
    read_way = ""

    async def open(self, conninfo: str, host: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def enqueue(self, way: str, rows: Sequence[Row]) -> list[int]:
        raise NotImplementedError

    async def claim(self, way: str, now: float) -> list[Row]:
        raise NotImplementedError

    async def settle(self, seqs: list[int], now: float) -> int:
        raise NotImplementedError

    async def read(self, seq: int) -> Row | None:
        raise NotImplementedError

    async def enqueue_one(self, way: str, row: Row) -> int:
        """One event's enqueue by one of many concurrent requests, committed."""
        raise NotImplementedError

    def prepare(self, way: str) -> None:
        """Before a run of `enqueue_one` in `way`; `prepare("")` restores the defaults."""


class Asyncpg(Client):
    name = "a: asyncpg"
    enqueue_ways = ("unnest", "fetchmany", "copy")
    claim_ways = ("binary",)
    read_way = "fetchrow"
    concurrent_ways = ("pool of 16",)

    async def open(self, conninfo: str, host: str) -> None:
        self.db = await asyncpg.connect(host=host, user="postgres", database="postgres")
        await self.db.execute(STAGING)
        self.pool = await asyncpg.create_pool(
            host=host, user="postgres", database="postgres", min_size=TASKS, max_size=TASKS
        )

    async def close(self) -> None:
        await self.pool.close()
        await self.db.close()

    async def enqueue(self, way: str, rows: Sequence[Row]) -> list[int]:
        if way == "unnest":
            return [r[0] for r in await self.db.fetch(AP_UNNEST, *columns(rows))]
        async with self.db.transaction():
            if way == "fetchmany":
                return [r[0] for r in await self.db.fetchmany(AP_VALUES, rows)]
            await self.db.copy_records_to_table("outbox_in", records=rows, columns=ROW_COLUMNS)
            return [r[0] for r in await self.db.fetch(FROM_STAGING)]

    async def claim(self, way: str, now: float) -> list[Row]:
        return [tuple(r) for r in await self.db.fetch(AP_CLAIM, *_claim_args(now))]

    async def settle(self, seqs: list[int], now: float) -> int:
        status = await self.db.execute(AP_SETTLE, now, "trace", seqs)
        return int(status.rsplit(" ", 1)[1])

    async def read(self, seq: int) -> Row | None:
        row = await self.db.fetchrow(AP_READ, seq)
        return None if row is None else tuple(row)

    async def enqueue_one(self, way: str, row: Row) -> int:
        async with self.pool.acquire() as db:
            return int(await db.fetchval(AP_VALUES, *row))


class PsycopgAsync(Client):
    name = "b: psycopg async"
    enqueue_ways = ("unnest", "unnest %b", "executemany", "copy")
    claim_ways = ("text", "binary")
    concurrent_ways = ("pool of 16",)
    read_way = "execute, fetchone"

    async def open(self, conninfo: str, host: str) -> None:
        self.db = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        await self.db.execute(STAGING)
        self.pool = psycopg_pool.AsyncConnectionPool(
            conninfo, min_size=TASKS, max_size=TASKS, kwargs={"autocommit": True}, open=False
        )
        await self.pool.open(wait=True)

    async def close(self) -> None:
        await self.pool.close()
        await self.db.close()

    async def enqueue(self, way: str, rows: Sequence[Row]) -> list[int]:
        return await apg_enqueue(way, self.db, rows)

    async def claim(self, way: str, now: float) -> list[Row]:
        async with self.db.cursor(binary=way == "binary") as cur:
            await cur.execute(PG_CLAIM, _claim_args(now))
            return await cur.fetchall()

    async def settle(self, seqs: list[int], now: float) -> int:
        cur = await self.db.execute(PG_SETTLE, (now, "trace", seqs))
        return cur.rowcount

    async def read(self, seq: int) -> Row | None:
        cur = await self.db.execute(PG_READ, (seq,))
        return await cur.fetchone()

    async def enqueue_one(self, way: str, row: Row) -> int:
        async with self.pool.connection() as db:
            cur = await db.execute(PG_VALUES, row)
            return int((await cur.fetchone())[0])  # type: ignore[index]


class PsycopgThread(Client):
    name = "c: psycopg sync, thread"
    enqueue_ways = ("unnest", "unnest %b", "executemany", "copy")
    claim_ways = ("text", "binary")
    read_way = "reader thread"
    concurrent_ways = (
        "group commit, savepoint per job",
        "group commit, savepoint per job, pipeline",
        "group commit, no savepoints",
    )

    async def open(self, conninfo: str, host: str) -> None:
        self.writer = ThreadConnection(conninfo, group=True, setup=STAGING)
        self.reader = ThreadConnection(conninfo, group=False)

    async def close(self) -> None:
        self.writer.close()
        self.reader.close()

    async def enqueue(self, way: str, rows: Sequence[Row]) -> list[int]:
        return await self.writer.run(lambda db: pg_enqueue(way, db, rows))

    async def claim(self, way: str, now: float) -> list[Row]:
        def job(db: psycopg.Connection[Any]) -> list[Row]:
            with db.cursor(binary=way == "binary") as cur:
                return cur.execute(PG_CLAIM, _claim_args(now)).fetchall()

        return await self.writer.run(job)

    async def settle(self, seqs: list[int], now: float) -> int:
        return await self.writer.run(
            lambda db: db.execute(PG_SETTLE, (now, "trace", seqs)).rowcount
        )

    async def read(self, seq: int) -> Row | None:
        return await self.reader.run(lambda db: db.execute(PG_READ, (seq,)).fetchone())

    def prepare(self, way: str) -> None:
        self.writer.savepoints = "no savepoints" not in way
        self.writer.pipeline = "pipeline" in way
        self.writer.commits = self.writer.jobs = 0

    async def enqueue_one(self, way: str, row: Row) -> int:
        return await self.writer.run(
            lambda db: int(db.execute(PG_VALUES, row).fetchone()[0])  # type: ignore[index]
        )


# --- measuring ------------------------------------------------------------------------------------
@dataclass
class Sample:
    events: int
    wall: float
    cpu: float
    server_cpu: float


@dataclass
class Series:
    statement: str
    client: str
    way: str
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [s.events / s.wall for s in self.samples]

    def median_rate(self) -> float:
        return statistics.median(self.rates())

    def cpu_us(self) -> float:
        return statistics.median(s.cpu / s.events * 1e6 for s in self.samples)

    def server_us(self) -> float:
        return statistics.median(s.server_cpu / s.events * 1e6 for s in self.samples)


class ServerCpu:
    """CPU seconds of every PostgreSQL process (the postmaster and its children, each one
    thread); a process that started since the last reading counts from zero. The scheduler's
    nanosecond count (/proc/PID/schedstat, https://docs.kernel.org/scheduler/sched-stats.html)
    where there is one: the tick-based user and system times move in 10 ms steps, too coarse
    for a run of a fraction of a second."""

    def __init__(self, pid: int) -> None:
        self._postmaster = psutil.Process(pid)
        self.precise = Path(f"/proc/{pid}/schedstat").exists()

    def total(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for proc in [self._postmaster, *self._postmaster.children()]:
            with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                if self.precise:
                    ran = Path(f"/proc/{proc.pid}/schedstat").read_text().split()[0]
                    out[proc.pid] = int(ran) / 1e9
                else:
                    times = proc.cpu_times()
                    out[proc.pid] = times.user + times.system
        return out

    @staticmethod
    def delta(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(t - before.get(pid, 0.0) for pid, t in after.items())


class Bench:
    def __init__(self, admin: psycopg.Connection[Any], server: ServerCpu) -> None:
        self.admin = admin
        self.server = server
        self.rows = Rows()
        self.series: dict[tuple[str, str, str], Series] = {}

    async def measure(
        self, statement: str, client: Client, way: str, body: Callable[[], Awaitable[int]]
    ) -> None:
        gc.collect()
        before = self.server.total()
        cpu, wall = time.process_time(), time.perf_counter()
        events = await body()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        server = ServerCpu.delta(before, self.server.total())
        key = (statement, client.name, way)
        series = self.series.setdefault(key, Series(statement, client.name, way))
        series.samples.append(Sample(events, wall, cpu, server))
        if isinstance(client, PsycopgThread) and statement.startswith("16 tasks"):
            w = client.writer
            series.notes.append(f"{w.jobs / max(w.commits, 1):.1f}")

    def refill(self, target: int) -> list[int]:
        """Only queued rows left, `target` of them, vacuumed; returns some seqs to read."""
        db, now = self.admin, time.time()
        db.execute("DELETE FROM outbox WHERE status <> 'queued'")
        count = db.execute("SELECT count(*) FROM outbox WHERE status = 'queued'").fetchone()
        missing = target - int(count[0])  # type: ignore[index]
        if missing < 0:
            db.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE status = 'queued' "
                "ORDER BY seq DESC LIMIT %s)",
                (-missing,),
            )
        elif missing > 0:
            db.execute(
                f"INSERT INTO outbox ({INSERT_COLUMNS}) SELECT 'project-' || g %% 3, "  # noqa: S608
                "'user-' || g %% 11, NULL, 'fill-' || g || '-' || %s, 'Purchase', "
                "'123456789012345', NULL, %s, 'queued', 0, %s + g * 0.001, %s, %s, NULL, %s "
                "FROM generate_series(1, %s) AS g",
                (now, now + 86400, now - 1000, now, now, event_body(0, now), missing),
            )
        db.execute("VACUUM (ANALYZE) outbox")
        return [
            r[0]
            for r in db.execute(
                "SELECT seq FROM outbox TABLESAMPLE SYSTEM (5) LIMIT 2000"
            ).fetchall()
        ]

    async def enqueue(self, clients: list[Client], turn: int, size: int, batches: int) -> None:
        statement = f"enqueue, {size} row{'s' if size > 1 else ''}/commit"
        # COPY, one row at a time, costs the client and the server twice or more of the others.
        ways = (lambda c: c.enqueue_ways) if size > 1 else (lambda c: c.enqueue_ways[:-1])
        for client, way in rotated(clients, turn, ways):
            batches_rows = [self.rows.take(size, time.time()) for _ in range(batches)]

            async def body(client: Client = client, way: str = way, b: Any = batches_rows) -> int:
                for rows in b:
                    seqs = await client.enqueue(way, rows)
                    assert len(seqs) == len(rows)
                return size * batches

            await self.measure(statement, client, way, body)

    async def claim_settle(self, clients: list[Client], turn: int, claims: int) -> None:
        for client, way in rotated(clients, turn, lambda c: c.claim_ways):
            self.refill(QUEUE_ROWS)
            claimed: list[list[int]] = []

            async def claim(client: Client = client, way: str = way, out: Any = claimed) -> int:
                for _ in range(claims):
                    rows = await client.claim(way, time.time())
                    assert len(rows) == CLAIM_LIMIT, len(rows)
                    out.append([r[0] for r in rows])
                return claims * CLAIM_LIMIT

            async def settle(client: Client = client, done: Any = claimed) -> int:
                for seqs in done:
                    assert await client.settle(seqs, time.time()) == len(seqs)
                return claims * CLAIM_LIMIT

            await self.measure(f"claim {CLAIM_LIMIT:,} of {QUEUE_ROWS:,}", client, way, claim)
            if way == client.claim_ways[0]:
                await self.measure(f"settle {CLAIM_LIMIT:,}", client, "= ANY", settle)
            else:  # settled all the same, to leave no leases behind
                await settle()

    async def read(self, clients: list[Client], turn: int, count: int) -> None:
        seqs = self.refill(QUEUE_ROWS)
        for client, way in rotated(clients, turn, lambda c: (c.read_way,)):
            picks = random.choices(seqs, k=count)

            async def body(client: Client = client, picks: list[int] = picks) -> int:
                for seq in picks:
                    assert await client.read(seq) is not None
                return len(picks)

            await self.measure("point read by seq", client, way, body)

    async def concurrent(self, clients: list[Client], turn: int, each: int) -> None:
        statement = f"{TASKS} tasks, 1 row/commit each"
        for client, way in rotated(clients, turn, lambda c: c.concurrent_ways):
            client.prepare(way)
            per_task = [self.rows.take(each, time.time()) for _ in range(TASKS)]

            async def task(client: Client, way: str, rows: list[Row]) -> None:
                for row in rows:
                    await client.enqueue_one(way, row)

            async def body(client: Client = client, way: str = way, p: Any = per_task) -> int:
                await asyncio.gather(*(task(client, way, rows) for rows in p))
                return TASKS * each

            await self.measure(statement, client, way, body)
            client.prepare("")  # back to the writer's default


def rotated(
    clients: list[Client], turn: int, ways: Callable[[Client], tuple[str, ...]]
) -> Iterator[tuple[Client, str]]:
    """Every (client, way), the start moving one place each round."""
    pairs = [(c, w) for c in clients for w in ways(c)]
    shift = turn % len(pairs)
    yield from pairs[shift:] + pairs[:shift]


async def check(clients: list[Client], rows: Rows, admin: psycopg.Connection[Any]) -> None:
    """Each way returns each new row's own seq, in input order; reads and claims round-trip."""
    for client in clients:
        for way in client.enqueue_ways:
            batch = rows.take(100, time.time())
            seqs = await client.enqueue(way, batch)
            stored = dict(
                admin.execute(
                    "SELECT seq, event_id FROM outbox WHERE seq = ANY(%s)", (seqs,)
                ).fetchall()
            )
            if [stored.get(s) for s in seqs] != [r[3] for r in batch]:
                raise SystemExit(f"{client.name} {way}: seqs do not match the rows")
            got = await client.read(seqs[0])
            if got is None or got[3] != batch[0][3]:
                raise SystemExit(f"{client.name}: the point read returned {got!r}")
        for way in client.claim_ways:
            await client.enqueue("unnest", rows.take(10, time.time()))
            claimed = await client.claim(way, time.time() + 86400 * 30)
            if not claimed or bytes(claimed[0][10]) != rows_event(admin, claimed[0][0]):
                raise SystemExit(f"{client.name} {way}: the claim lost the event")
            assert await client.settle([r[0] for r in claimed], time.time()) == len(claimed)
        for way in client.concurrent_ways:
            client.prepare(way)
            batch = rows.take(TASKS, time.time())
            seqs = await asyncio.gather(*(client.enqueue_one(way, row) for row in batch))
            stored = dict(
                admin.execute(
                    "SELECT seq, event_id FROM outbox WHERE seq = ANY(%s)", (seqs,)
                ).fetchall()
            )
            if [stored.get(s) for s in seqs] != [r[3] for r in batch]:
                raise SystemExit(f"{client.name} {way}: seqs do not match the rows")
            if isinstance(client, PsycopgThread) and client.writer.savepoints:
                await check_savepoints(client.writer, rows, admin)
            client.prepare("")
    admin.execute("DELETE FROM outbox")


async def check_savepoints(
    writer: ThreadConnection, rows: Rows, admin: psycopg.Connection[Any]
) -> None:
    """A failing job in a group commit fails alone: the others in its batch still commit."""
    commits = writer.commits
    busy = writer.run(lambda db: time.sleep(0.05))  # the next jobs queue up meanwhile
    good = rows.take(2, time.time())
    first = writer.run(lambda db: db.execute(PG_VALUES, good[0]).fetchone())
    failing = writer.run(lambda db: db.execute("SELECT 1 / 0").fetchone())
    second = writer.run(lambda db: db.execute(PG_VALUES, good[1]).fetchone())
    outcomes = await asyncio.gather(busy, first, failing, second, return_exceptions=True)
    ids = admin.execute(
        "SELECT event_id FROM outbox WHERE event_id = ANY(%s) ORDER BY seq",
        ([r[3] for r in good],),
    ).fetchall()
    if (
        writer.commits - commits > 2  # all four in one, or the busy job's then the others'
        or not isinstance(outcomes[2], psycopg.errors.DivisionByZero)
        or [i[0] for i in ids] != [r[3] for r in good]
    ):
        raise SystemExit(f"a failing job took its batch down: {outcomes!r}, {ids!r}")


def rows_event(admin: psycopg.Connection[Any], seq: int) -> bytes:
    return bytes(admin.execute("SELECT event FROM outbox WHERE seq = %s", (seq,)).fetchone()[0])  # type: ignore[index]


# --- the run --------------------------------------------------------------------------------------
@dataclass
class Plan:
    rounds: int
    single: int  # 1-row enqueues per client and way per round
    batches: int  # 100-row enqueues
    claims: int  # claims of 1,000 (and as many settles)
    reads: int
    each: int  # enqueues per task in the concurrent run


async def run(conninfo: str, host: str, server: ServerCpu, plan: Plan) -> Bench:
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(SCHEMA)
        clients: list[Client] = [Asyncpg(), PsycopgAsync(), PsycopgThread()]
        for client in clients:
            await client.open(conninfo, host)
        try:
            bench = Bench(admin, server)
            await check(clients, bench.rows, admin)
            bench.refill(QUEUE_ROWS)
            admin.execute("CHECKPOINT")
            # One unmeasured round first: prepared statements, caches, the pools' connections.
            for turn in range(-1, plan.rounds):
                started = time.perf_counter()
                await bench.enqueue(clients, turn, 1, plan.single)
                await bench.enqueue(clients, turn, 100, plan.batches)
                await bench.claim_settle(clients, turn, plan.claims)
                await bench.read(clients, turn, plan.reads)
                await bench.concurrent(clients, turn, plan.each)
                if turn < 0:
                    bench.series.clear()
                print(
                    f"round {turn + 1}/{plan.rounds}: {time.perf_counter() - started:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            return bench
        finally:
            for client in clients:
                await client.close()


NOTES = [
    "Bold: each client's fastest way where it has several. Ways: `unnest`, one INSERT ... "
    "SELECT FROM unnest(arrays) RETURNING seq (`%b`: psycopg's binary parameters); "
    "`executemany`/`fetchmany`, one INSERT per row, pipelined by the driver; `copy`, COPY "
    "into a temporary table, then INSERT ... SELECT RETURNING seq. a and b run a single "
    "statement in autocommit (one round trip) and several in a transaction; c runs every "
    "write as a job of the group-commit writer thread (BEGIN, the job, COMMIT), every read "
    "on a reader thread's autocommit connection. 16 tasks: a and b each take a pool "
    "connection and commit alone; c's jobs waiting together share one transaction, each "
    "in a SAVEPOINT (as server/storage/writer.py), or none (a failing job fails its batch)."
]


def report(bench: Bench) -> tuple[str, dict[str, Any]]:
    header = [
        "statement",
        "client",
        "way",
        "events/s (median)",
        "slowest–fastest round",
        "client CPU µs/event",
        "server CPU µs/event",
    ]
    lines, best_lines = [], []
    by_statement: dict[str, list[Series]] = {}
    for series in bench.series.values():
        by_statement.setdefault(series.statement, []).append(series)
    for statement, group in by_statement.items():
        best: dict[str, Series] = {}
        for series in group:
            if (
                series.client not in best
                or series.median_rate() > best[series.client].median_rate()
            ):
                best[series.client] = series
        for series in group:
            way = series.way + (f" ({statistics.median(map(float, series.notes)):.1f} jobs/commit)"
                                if series.notes else "")  # fmt: skip
            mark = "**" if best[series.client] is series and len(group) > len(best) else ""
            rates = series.rates()
            lines.append(
                [statement, series.client, f"{mark}{way}{mark}", f"{series.median_rate():,.0f}",
                 f"{min(rates):,.0f}–{max(rates):,.0f}", f"{series.cpu_us():.1f}",
                 f"{series.server_us():.1f}"]
            )  # fmt: skip
        c = next(s for name, s in best.items() if name.startswith("c"))
        ratios = ", ".join(
            f"{name[0]}{f' ({s.way})' if s.way else ''} {s.median_rate() / c.median_rate():.2f}×"
            for name, s in best.items()
        )
        best_lines.append(f"- {statement}: each client's best, events/s ÷ c's best: {ratios}")
    markdown = "\n".join([table(header, lines), "", *NOTES, "", *best_lines])
    data = {
        "series": [
            {
                "statement": s.statement,
                "client": s.client,
                "way": s.way,
                "events_per_s_median": s.median_rate(),
                "client_cpu_us_per_event": s.cpu_us(),
                "server_cpu_us_per_event": s.server_us(),
                "rounds": [vars(x) for x in s.samples],
                "jobs_per_commit": [float(n) for n in s.notes],
            }
            for s in bench.series.values()
        ],
        "best": best_lines,
    }
    return markdown, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=0, help="measured rounds (9; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and operations")
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="uvicorn's default"
    )
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default="on",
        help="off: commits do not wait for the WAL's fsync, leaving the clients' own costs",
    )
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    plan = (
        Plan(rounds=2, single=150, batches=15, claims=4, reads=500, each=50)
        if args.quick
        else Plan(rounds=9, single=400, batches=40, claims=8, reads=2000, each=150)
    )
    if args.rounds:
        plan.rounds = args.rounds
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    # pgserver asks platformdirs for a runtime directory, which warns when XDG_RUNTIME_DIR is unset.
    warnings.filterwarnings("ignore", module="platformdirs")
    import pgserver

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pgbench") as tmp:
        server = pgserver.get_server(tmp, cleanup_mode="stop")
        try:
            conninfo = server.get_uri()
            host = conninfo.split("host=", 1)[1]
            pid = server.get_pid()
            assert pid is not None
            with psycopg.connect(conninfo, autocommit=True) as db:
                # https://www.postgresql.org/docs/16/runtime-config-wal.html#GUC-SYNCHRONOUS-COMMIT
                db.execute(f"ALTER SYSTEM SET synchronous_commit = {args.synchronous_commit}")
                db.execute("SELECT pg_reload_conf()")
            for _ in range(100):  # the postmaster rereads its configuration on its own time
                with psycopg.connect(conninfo) as db:
                    now = db.execute("SHOW synchronous_commit").fetchone()
                if now == (args.synchronous_commit,):
                    break
                time.sleep(0.02)
            with psycopg.connect(conninfo) as db:
                settings = {
                    name: str(db.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
                    for name in ("server_version", "fsync", "synchronous_commit",
                                 "wal_sync_method", "shared_buffers")
                }  # fmt: skip
            with asyncio.Runner(loop_factory=factory) as runner:
                bench = runner.run(run(conninfo, host, ServerCpu(pid), plan))
        finally:
            server.cleanup()
    markdown, data = report(bench)
    versions = ", ".join(
        f"{name} {version(name)}" for name in ("asyncpg", "psycopg", "psycopg-binary", "uvloop")
    )
    about = (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {versions}, loop "
        f"{args.loop}; PostgreSQL {settings['server_version']} (pgserver, unix socket; fsync "
        f"{settings['fsync']}, synchronous_commit {settings['synchronous_commit']}, "
        f"{settings['wal_sync_method']}); {plan.rounds} rounds, "
        f"{time.perf_counter() - started:.0f} s in all."
    )
    print(f"{markdown}\n\n{about}")
    if args.json:
        data.update(about=about, settings=settings, plan=vars(plan))
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
