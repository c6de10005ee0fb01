"""PostgreSQL: the state several funnelgate instances share (psycopg 3).

The statements of storage/*.py are written once, in SQLite's `?` placeholder style, as plain
functions of a connection; `PgConnection` gives them a psycopg connection that speaks that
style, so the outbox, credentials, idempotency keys and counters have one set of statements
and two backends. Where the dialects differ the statements ask `is_postgres(db)`.

Threads, as for SQLite: one thread owns the write connection and commits every write waiting
when it is free in one transaction (group commit, writer.py); reads run on pooled connections
in worker threads. A job is a synchronous function of a connection, so the same job runs on
either backend; the event loop only awaits its future. Every connection reconnects by itself:
a write or read that meets a dead server fails (503 STORAGE_UNAVAILABLE where a caller waits),
and the next one opens a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from server.logs import log
from server.storage.writer import GroupCommit, Waiting, settle

T = TypeVar("T")
CONNECT_TIMEOUT_SECONDS = 5
# A statement that runs longer is cancelled by the server: nothing holds the writer for ever.
STATEMENT_TIMEOUT_MS = 30_000
TCP_USER_TIMEOUT_MS = 15_000  # unacknowledged data: the connection is dead past this
READERS = 4  # pooled read connections per process
# How long a read waits for a pooled connection: while the database is down, a call answers
# 503 after this, rather than after a whole connect timeout.
READ_WAIT_SECONDS = 2.0
RECONNECT_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)  # waits between attempts; the last repeats
OUTBOX_CHANNEL = "funnelgate_outbox"  # NOTIFY: events became due (storage/schema_pg.py)
# How often the listener looks up from its wait for notices: how soon it sees close() (a
# cancel does not end psycopg's notifies() wait, which only returns at its timeout).
LISTEN_POLL_SECONDS = 0.1
_PLACEHOLDER = re.compile(r"\?(\d*)")


@functools.lru_cache(maxsize=1024)
def dialect(sql: str) -> str:
    """A statement written for SQLite as psycopg takes it: `?` becomes `%s` (a literal `%`
    doubles), `BEGIN IMMEDIATE` becomes `BEGIN` (PostgreSQL takes row locks as it writes)."""
    if sql == "BEGIN IMMEDIATE":
        return "BEGIN"

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1):
            raise ValueError(f"numbered placeholders are SQLite's only: {sql[:80]}")
        return "%s"

    return _PLACEHOLDER.sub(placeholder, sql.replace("%", "%%"))


class PgConnection:
    """A psycopg connection (autocommit: transactions are the statements' own BEGIN and
    COMMIT, as on SQLite) with sqlite3.Connection's `execute` and `executemany`."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.raw.execute(dialect(sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> psycopg.Cursor[Any]:
        cursor = self.raw.cursor()
        if rows:
            cursor.executemany(dialect(sql), rows)
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != pq.TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    def close(self) -> None:
        self.raw.close()


def connect(url: str) -> PgConnection:
    """A new autocommit connection; psycopg.OperationalError when the server cannot be
    reached within CONNECT_TIMEOUT_SECONDS."""
    raw = psycopg.connect(url, **_options(url))
    return PgConnection(raw)


def _options(url: str) -> dict[str, Any]:
    """What every connection adds to the URL's own parameters (which keep their say: a
    `search_path` in its `options` stays, and its own `application_name` wins).

    The statement timeout runs on the server; a host that stops answering (a partition,
    not a restart) is found by TCP keepalives and `tcp_user_timeout` instead, so a write
    waits seconds for it, not the kernel's 15 minutes
    (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-TCP-USER-TIMEOUT)."""
    given = conninfo_to_dict(url)
    return {
        "autocommit": True,
        "connect_timeout": given.get("connect_timeout", CONNECT_TIMEOUT_SECONDS),
        "options": f"{given.get('options', '')} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
        "application_name": given.get("application_name", "funnelgate"),
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 3,
        "keepalives_count": 3,
        "tcp_user_timeout": given.get("tcp_user_timeout", TCP_USER_TIMEOUT_MS),
    }


def _backoff(attempt: int) -> float:
    return RECONNECT_SECONDS[min(attempt, len(RECONNECT_SECONDS) - 1)]


class PgWriter(GroupCommit):
    """Group commit on PostgreSQL (writer.py's Writer says why). A job that raises makes the
    whole transaction roll back; its batch then runs again one job per transaction, so only
    the failing job fails. (Not a SAVEPOINT per job: past 64 subtransactions in one
    transaction every other session's snapshots slow down,
    https://www.postgresql.org/docs/current/subxacts.html.)"""

    def __init__(self, url: str) -> None:
        super().__init__("funnelgate-pg-writer")
        self._url = url
        self._db: PgConnection | None = None  # connected on the first batch
        self._thread.start()

    def _close_connection(self) -> None:
        if self._db is not None:
            self._db.close()

    def _connection(self) -> PgConnection:
        if self._db is None or self._db.broken:
            if self._db is not None:
                self._db.close()
                self._db = None
            self._db = connect(self._url)
        return self._db

    def _begun(self) -> PgConnection:
        """A connection in a new transaction. An idle connection the server ended meanwhile (a
        restart) is only found dead when used: nothing has run yet, so a new one is tried."""
        db = self._connection()
        try:
            db.execute("BEGIN")
        except psycopg.OperationalError:
            if not db.broken:
                raise
            db = self._connection()
            db.execute("BEGIN")
        return db

    def _commit(self, batch: list[Waiting]) -> None:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]
        try:
            db = self._begun()
            outcomes = self._together(db, batch)
            self.failing = False
        except _JobFailed:
            outcomes = self._one_by_one(batch)
        except psycopg.Error as exc:  # the server or the network: nothing of the batch holds
            self._failed(exc)
            outcomes = [(future, None, exc) for _, _, future in batch]
        settle(batch, outcomes)

    def _together(
        self, db: PgConnection, batch: list[Waiting]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """The batch in the transaction `db` has begun, committed."""
        results = []
        try:
            for job, _, _ in batch:
                try:
                    results.append(job(db))
                except Exception as exc:
                    if isinstance(exc, psycopg.OperationalError) and db.broken:
                        raise  # the server or the network: nothing of the batch holds
                    # The job's own, even an OperationalError on a live connection (its
                    # statement timeout, a deadlock with another instance): it fails alone.
                    raise _JobFailed from exc
            db.execute("COMMIT")
        except BaseException:
            if not db.broken and db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return [
            (future, result, None) for (_, _, future), result in zip(batch, results, strict=True)
        ]

    def _one_by_one(
        self, batch: list[Waiting]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """Each job in a transaction of its own; once the connection is lost, the jobs left
        fail with that error rather than each wait for a connect of its own."""
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        lost: BaseException | None = None
        for job, _, future in batch:
            if lost is not None:
                outcomes.append((future, None, lost))
                continue
            outcome = self._alone(job, future)
            outcomes.append(outcome)
            if outcome[2] is not None and self._db is None:
                lost = outcome[2]
        return outcomes

    def _alone(
        self, job: Callable[[Any], Any], future: asyncio.Future[Any]
    ) -> tuple[asyncio.Future[Any], Any, BaseException | None]:
        try:
            db = self._begun()
            try:
                result = job(db)
                db.execute("COMMIT")
            except BaseException:
                if not db.broken and db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except psycopg.OperationalError as exc:
            if self._db is None or self._db.broken:  # not the job's: the server's
                self._failed(exc)
            return future, None, exc
        except Exception as exc:
            return future, None, exc
        self.failing = False
        return future, result, None

    def _failed(self, exc: psycopg.Error) -> None:
        if not self.failing:
            log("storage_write_failed", logging.ERROR, error=type(exc).__name__)
        self.failing = True
        if self._db is not None and self._db.broken:
            self._db.close()
            self._db = None


class _JobFailed(Exception):
    """A job raised: the batch runs again, one job per transaction."""


class _Stale(psycopg.OperationalError):
    """A pooled connection turned out dead when used."""


class Readers:
    """Reads on pooled connections, in worker threads: the event loop never waits on the
    network. A connection the server ended while it sat in the pool (a restart) is found
    when a read uses it: the read runs again on another (reads change nothing), and the pool
    replaces the dead one. (Not a check before every read: a round trip each.)"""

    def __init__(self, url: str) -> None:
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=READERS,
            kwargs=_options(url),
            timeout=READ_WAIT_SECONDS,
            open=False,
            name="funnelgate-readers",
        )
        self._pool.open(wait=False)
        self._slots = asyncio.Semaphore(READERS)

    async def read(self, job: Callable[[Any], T]) -> T:
        async with self._slots:
            return await asyncio.to_thread(self.read_now, job)

    def read_now(self, job: Callable[[Any], T]) -> T:
        for _ in range(READERS):  # each pooled connection may be one the server ended
            try:
                return self._once(job)
            except _Stale:
                continue
        return self._once(job)

    def _once(self, job: Callable[[Any], T]) -> T:
        with self._pool.connection() as raw:
            try:
                return job(PgConnection(raw))
            except psycopg.OperationalError as exc:
                if raw.broken:
                    raise _Stale from exc
                raise

    def close(self) -> None:
        self._pool.close()


class Listener:
    """LISTEN on the outbox's channel, in a thread of its own: every NOTIFY (new or replayed
    events, from any instance or the CLI) calls `wake` on the loop. Reconnects by itself, and
    wakes once after reconnecting (a notice sent meanwhile was missed)."""

    def __init__(self, url: str, wake: Callable[[], None]) -> None:
        self._url = url
        self._wake = wake
        self._loop = asyncio.get_running_loop()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="funnelgate-listen", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Within LISTEN_POLL_SECONDS (a server that does not answer: its connect timeout)."""
        self._stopping.set()
        self._thread.join(timeout=CONNECT_TIMEOUT_SECONDS)

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._url, **_options(self._url)) as raw:
                    raw.execute(f"LISTEN {OUTBOX_CHANNEL}")
                    attempt = 0
                    self._notify()
                    while not self._stopping.is_set():
                        for _ in raw.notifies(timeout=LISTEN_POLL_SECONDS, stop_after=1):
                            self._notify()
            except psycopg.Error as exc:
                if self._stopping.is_set():
                    return
                log("storage_listen_failed", logging.WARNING, error=type(exc).__name__)
                self._stopping.wait(_backoff(attempt))
                attempt += 1

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody to wake
            self._loop.call_soon_threadsafe(self._wake)
