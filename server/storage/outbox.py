"""The outbox: every event funnelgate has accepted and not yet finished with, on disk.

A row holds the event as Meta receives it (customer data already hashed by tools/), the
project and user it belongs to, the credential it was accepted for, and its delivery state;
never an access token (the dispatcher opens the credential's token when it sends) and never a
raw e-mail or phone.

States: `queued` (due at `next_at`), `held` (Meta refused its credential; waits for
`funnelgate credentials set`), `delivered` and `failed` (kept `[storage] retention_days`).
A claim is a lease: it moves `next_at` past the claim's end, so an event whose sender died
is due again once the lease runs out, and is re-sent with the same event_id (Meta deduplicates
on event_id + event_name: https://developers.facebook.com/docs/marketing-api/conversions-api/deduplicate-pixel-and-server-events).

The statements are plain functions of a connection, so the server (through the group-commit
writer, writer.py) and the CLI (its own connection) share them.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson

from server.errors import StorageUnavailable
from server.logs import log
from server.storage import breakers, idempotency, minutes
from server.storage.database import (
    ERRORS,
    ERRORS_OR_TIMEOUT,
    Connection,
    Database,
    SqliteDatabase,
    conditions,
    is_postgres,
    read_for_caller,
)
from server.storage.postgres import OUTBOX_CHANNEL
from server.storage.writer import PRUNE_BATCH
from tools.capi import MAX_AGE_SECONDS, MAX_AGE_SECONDS_PHYSICAL_STORE

TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
    seq             INTEGER PRIMARY KEY,
    project_id      TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    event_name      TEXT NOT NULL,
    pixel_id        TEXT NOT NULL,
    test_event_code TEXT,
    expires_at      REAL NOT NULL,  -- event_time + Meta's age limit: no use sending after it
    status          TEXT NOT NULL,  -- queued | held | delivered | failed
    attempts        INTEGER NOT NULL,
    next_at         REAL NOT NULL,  -- when due; while claimed, the end of the lease
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    fbtrace_id      TEXT,
    error           BLOB,           -- JSON: {code, message, upstream}
    event           BLOB NOT NULL,  -- the event as Meta receives it, JSON
    credential_id   TEXT            -- the credential it was accepted for; NULL: the project's
)
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_at) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS outbox_event ON outbox (project_id, event_id);
CREATE INDEX IF NOT EXISTS outbox_held_credential ON outbox (project_id, credential_id)
    WHERE status = 'held';
CREATE INDEX IF NOT EXISTS outbox_done ON outbox (updated_at)
    WHERE status IN ('delivered', 'failed');
CREATE INDEX IF NOT EXISTS outbox_pending_age ON outbox (created_at)
    WHERE status IN ('queued', 'held');
CREATE INDEX IF NOT EXISTS outbox_failed ON outbox (updated_at) WHERE status = 'failed';
"""
STATUSES = ("queued", "held", "delivered", "failed")
# What the pending events of a removed credential fail with (never sent with another token).
CREDENTIAL_REMOVED = {"code": "INTEGRATION_NOT_ENABLED", "message": "The credential was removed."}
PENDING = ("queued", "held")
ALL = 2**62  # a LIMIT that takes every row (PostgreSQL refuses SQLite's -1)
NOTIFY_SECONDS = 0.1  # on PostgreSQL, new events are announced at most this often (Outbox)
_COLUMNS = (
    "seq, project_id, user_id, credential_id, event_id, event_name, pixel_id, test_event_code, "
    "expires_at, attempts, event"
)


def create_schema(db: Connection) -> None:
    db.executescript(TABLE)
    _add_credential_column(db)
    db.executescript(INDEXES)


def tie_to_credentials(db: Connection) -> None:
    """Schema version 2 (credentials.py, in its migration's transaction): a pending event of
    version 1 was for its user's only credential, which is now that user's default one."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'outbox'").fetchone() is None:
        return
    if _add_credential_column(db):
        db.execute(
            "UPDATE outbox SET credential_id = (SELECT credential_id FROM credentials AS c "
            "WHERE c.project_id = outbox.project_id AND c.user_id = outbox.user_id "
            "AND c.is_default) WHERE status IN ('queued', 'held')"
        )
    db.execute("DROP INDEX IF EXISTS outbox_held")  # version 1's, by user


def _add_credential_column(db: Connection) -> bool:
    """Adds version 2's column to a version 1 table; whether it had to."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
    if "credential_id" in columns:
        return False
    db.execute("ALTER TABLE outbox ADD COLUMN credential_id TEXT")
    return True


def expires_at(event: dict[str, Any]) -> float:
    """When Meta stops accepting the event (Meta's `event_time` limits:
    https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/server-event)."""
    physical = event.get("action_source") == "physical_store"
    return float(event["event_time"]) + (
        MAX_AGE_SECONDS_PHYSICAL_STORE if physical else MAX_AGE_SECONDS
    )


class NewEvent(NamedTuple):
    """One event to enqueue (a tuple: thousands are made per batch call)."""

    project_id: str
    user_id: str
    credential_id: str | None  # None: the project's token
    pixel_id: str
    test_event_code: str | None
    event: dict[str, Any]
    data: bytes  # `event` as JSON


class Claimed(NamedTuple):
    """A claimed row (a tuple: a claim makes up to 5,000)."""

    seq: int
    project_id: str
    user_id: str
    credential_id: str | None
    event_id: str
    event_name: str
    pixel_id: str
    test_event_code: str | None
    expires_at: float
    attempts: int
    data: bytes


Row = tuple[Any, ...]  # an outbox row's values, in _INSERT_COLUMNS order
_INSERT_COLUMNS = (
    "project_id, user_id, credential_id, event_id, event_name, pixel_id, test_event_code, "
    "expires_at, attempts, next_at, created_at, updated_at, error, event"
)
_INSERT_TYPES = (
    "text", "text", "text", "text", "text", "text", "text",
    "float8", "int4", "float8", "float8", "float8", "bytea", "bytea",
)  # fmt: skip
_PG_INSERT = (
    f"INSERT INTO outbox ({_INSERT_COLUMNS}, status) SELECT *, 'queued' FROM unnest("  # noqa: S608
    + ", ".join(f"%b::{kind}[]" for kind in _INSERT_TYPES)
    + ") RETURNING seq"
)


def rows_of(
    events: Sequence[NewEvent],
    *,
    now: float,
    next_at: float,
    attempts: int = 0,
    error: dict[str, Any] | None = None,
) -> list[Row]:
    error_json = orjson.dumps(error) if error else None
    now, next_at = float(now), float(next_at)  # one type per column (PostgreSQL's arrays)
    return [
        (e.project_id, e.user_id, e.credential_id, str(e.event["event_id"]),
         str(e.event["event_name"]), e.pixel_id, e.test_event_code, expires_at(e.event),
         attempts, next_at, now, now, error_json, e.data)
        for e in events
    ]  # fmt: skip


def insert(db: Connection, rows: Sequence[Row]) -> list[int]:
    """The new rows' seqs, in the order of `rows`."""
    if is_postgres(db):
        # One statement whatever the count: the columns as arrays (PostgreSQL's unnest). Seqs
        # are drawn as the rows are inserted, in order, so sorted they match `rows`.
        # Binary parameters (%b): about 3 times psycopg's text form here (bench/pg_drivers.py).
        columns = list(zip(*rows, strict=True)) if rows else [()] * len(_INSERT_TYPES)
        found = db.raw.execute(_PG_INSERT, [list(column) for column in columns]).fetchall()
        return sorted(int(row[0]) for row in found)
    # One statement, so they are consecutive: SQLite gives a new row the largest rowid plus
    # one, and nothing else writes meanwhile.
    db.executemany(
        f"INSERT INTO outbox ({_INSERT_COLUMNS}, status) "  # noqa: S608
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
        rows,
    )
    last = int(db.execute("SELECT last_insert_rowid()").fetchone()[0])
    return list(range(last - len(rows) + 1, last + 1))


def claim(db: Connection, *, now: float, lease_until: float, limit: int) -> list[Claimed]:
    """Due events, oldest due first (then in seq order, so a request's rows are mostly one
    run of seqs), leased until `lease_until`. On PostgreSQL rows another instance is claiming
    are skipped, not waited for (SKIP LOCKED:
    https://www.postgresql.org/docs/current/sql-select.html#SQL-FOR-UPDATE-SHARE)."""
    locking = " FOR UPDATE SKIP LOCKED" if is_postgres(db) else ""
    rows = db.execute(
        f"UPDATE outbox SET next_at = ? WHERE seq IN (SELECT seq FROM outbox "  # noqa: S608
        f"WHERE status = 'queued' AND next_at <= ? ORDER BY next_at, seq LIMIT ?{locking}) "
        f"RETURNING {_COLUMNS}",
        (lease_until, now, limit),
    ).fetchall()
    return [Claimed._make(row) for row in rows]


def renew(db: Connection, seqs: Iterable[int], *, lease_until: float) -> None:
    """Extends the claims on rows still queued (a settled row is left as it is)."""
    _update(db, "next_at = ?", (lease_until,), seqs, "status = 'queued'")


def next_due(db: Connection) -> float | None:
    row = db.execute("SELECT min(next_at) FROM outbox WHERE status = 'queued'").fetchone()
    return None if row[0] is None else float(row[0])


def pending_count(db: Connection) -> int:
    """Queued and held rows, counted on their partial indexes."""
    row = db.execute(
        "SELECT (SELECT count(*) FROM outbox WHERE status = 'queued') + "
        "(SELECT count(*) FROM outbox WHERE status = 'held')"
    ).fetchone()
    return int(row[0])


def oldest_pending(db: Connection) -> float | None:
    """When the oldest queued or held event was accepted: the first entry of
    `outbox_pending_age`, not a scan."""
    row = db.execute(
        "SELECT min(created_at) FROM outbox WHERE status IN ('queued', 'held')"
    ).fetchone()
    return None if row[0] is None else float(row[0])


Gauges = tuple[int, int, int, float | None]  # queued, held, failed, oldest pending


def gauges(db: Connection) -> Gauges:
    """(queued, held, failed, oldest pending acceptance time) for the metrics, each from a
    partial index: the counts cost one step per row of their status, never a table scan."""
    queued, held, failed = db.execute(
        "SELECT (SELECT count(*) FROM outbox WHERE status = 'queued'), "
        "(SELECT count(*) FROM outbox WHERE status = 'held'), "
        "(SELECT count(*) FROM outbox WHERE status = 'failed')"
    ).fetchone()
    return int(queued), int(held), int(failed), oldest_pending(db)


def mark_delivered(
    db: Connection, seqs: Iterable[int], *, now: float, fbtrace_id: str | None
) -> int:
    """Counts only rows that were still pending (a replayed or duplicate send changes none)."""
    return _update(
        db,
        "status = 'delivered', attempts = attempts + 1, updated_at = ?, fbtrace_id = ?, "
        "error = NULL",
        (now, fbtrace_id),
        seqs,
        "status IN ('queued', 'held')",
    )


def _update(
    db: Connection, assignments: str, args: tuple[Any, ...], seqs: Iterable[int], where: str
) -> int:
    """`UPDATE outbox SET <assignments>` on the rows `seqs` names that meet `where`; how many.
    On PostgreSQL one statement over an array of seqs, which the planner takes through the
    primary key whatever the table's statistics say (a statement per seq is planned from
    statistics, and while they are stale, say a backlog that built during a Meta outage, it
    scanned a partial index per row); on SQLite one statement per run of consecutive seqs
    (a claim's seqs mostly are one)."""
    if is_postgres(db):
        chosen = sorted(set(seqs))
        if not chosen:
            return 0
        return int(
            db.execute(
                f"UPDATE outbox SET {assignments} WHERE seq = ANY(?::bigint[]) AND {where}",  # noqa: S608
                (*args, chosen),
            ).rowcount
        )
    return _each(
        db,
        f"UPDATE outbox SET {assignments} WHERE seq BETWEEN ? AND ? AND {where}",  # noqa: S608
        [(*args, first, last) for first, last in _runs(seqs)],
    )


def _runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive numbers, in order."""
    runs: list[tuple[int, int]] = []
    for seq in sorted(seqs):
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def mark_failed(
    db: Connection,
    seqs: Iterable[int],
    *,
    now: float,
    error: dict[str, Any],
    attempted: bool = True,
) -> int:
    return _update(
        db,
        "status = 'failed', attempts = attempts + ?, updated_at = ?, error = ?",
        (int(attempted), now, orjson.dumps(error)),
        seqs,
        "status IN ('queued', 'held')",
    )


def mark_held(db: Connection, seqs: Iterable[int], *, now: float, error: dict[str, Any]) -> None:
    _update(
        db,
        "status = 'held', attempts = attempts + 1, updated_at = ?, error = ?",
        (now, orjson.dumps(error)),
        seqs,
        "status = 'queued'",
    )


def reschedule(
    db: Connection,
    due: Iterable[tuple[int, float]],
    *,
    now: float,
    error: dict[str, Any] | None,
    attempted: bool = True,
) -> None:
    """(seq, next_at) pairs back to `queued`; `attempted` counts an attempt."""
    error_json = orjson.dumps(error) if error else None
    if is_postgres(db):  # one statement, through the primary key (see _update)
        pairs = sorted(due)
        if pairs:
            db.execute(
                "UPDATE outbox SET next_at = due.next_at, attempts = attempts + ?, "
                "updated_at = ?, error = coalesce(?, error) FROM unnest(?::bigint[], "
                "?::float8[]) AS due (seq, next_at) WHERE outbox.seq = due.seq "
                "AND outbox.status = 'queued'",
                (int(attempted), now, error_json, [p[0] for p in pairs],
                 [float(p[1]) for p in pairs]),
            )  # fmt: skip
        return
    _each(
        db,
        "UPDATE outbox SET next_at = ?, attempts = attempts + ?, updated_at = ?, "
        "error = coalesce(?, error) WHERE seq = ? AND status = 'queued'",
        [(next_at, int(attempted), now, error_json, seq) for seq, next_at in due],
    )


def release_held(
    db: Connection,
    *,
    now: float,
    project_id: str | None = None,
    credential_id: str | None = None,
    project_token: bool = False,
    limit: int = ALL,
) -> int:
    """Held events (all, a project's, one credential's, or those for a project's token) due
    again now; at most `limit` of them, so a caller can commit in steps."""
    where = _held_where(project_id, credential_id)
    if project_token:
        where += " AND credential_id IS NULL"
    released = db.execute(
        "UPDATE outbox SET status = 'queued', next_at = ?, updated_at = ? WHERE seq IN "  # noqa: S608
        f"(SELECT seq FROM outbox WHERE {where} LIMIT ?)",
        (now, now, *_held_args(project_id, credential_id), limit),
    ).rowcount
    if released > 0:
        notify_due(db)
    return int(released)


def notify_due(db: Connection) -> None:
    """Events became due outside the dispatcher (a replay, a new token): on PostgreSQL every
    instance's dispatcher hears it at once (NOTIFY is delivered when the transaction commits,
    https://www.postgresql.org/docs/current/sql-notify.html); on SQLite its poll finds them."""
    if is_postgres(db):
        db.execute(f"NOTIFY {OUTBOX_CHANNEL}")


def fail_held(
    db: Connection,
    *,
    now: float,
    project_id: str,
    credential_id: str,
    error: dict[str, Any],
    limit: int = ALL,
) -> int:
    """One credential's held events failed with `error`; at most `limit` of them."""
    return int(
        db.execute(
            "UPDATE outbox SET status = 'failed', updated_at = ?, error = ? WHERE seq IN "  # noqa: S608
            f"(SELECT seq FROM outbox WHERE {_held_where(project_id, credential_id)} LIMIT ?)",
            (now, orjson.dumps(error), project_id, credential_id, limit),
        ).rowcount
    )


def _held_where(project_id: str | None, credential_id: str | None) -> str:
    """Literal conditions, so one credential's held rows come from the
    `outbox_held_credential` index rather than a scan (a `? IS NULL OR` condition keeps
    SQLite's planner off the index)."""
    if project_id is None:
        if credential_id is not None:
            raise ValueError("a credential's held events need its project")
        return "status = 'held'"
    if credential_id is None:
        return "status = 'held' AND project_id = ?"
    return "status = 'held' AND project_id = ? AND credential_id = ?"


def _held_args(project_id: str | None, credential_id: str | None) -> tuple[str, ...]:
    if project_id is None:
        return ()
    return (project_id,) if credential_id is None else (project_id, credential_id)


def prune(db: Connection, *, before: float, limit: int = PRUNE_BATCH) -> int:
    """Deletes up to `limit` finished rows last changed before `before`."""
    return int(
        db.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE status IN "
            "('delivered', 'failed') AND updated_at < ? LIMIT ?)",
            (before, limit),
        ).rowcount
    )


def _each(db: Connection, statement: str, rows: list[tuple[Any, ...]]) -> int:
    cursor = db.executemany(statement, rows)
    return max(int(cursor.rowcount), 0)


# --- reading: the status route and the CLI ---------------------------------------------------

_STATUS_COLUMNS = (
    "seq, project_id, user_id, event_id, event_name, pixel_id, status, attempts, next_at, "
    "created_at, updated_at, fbtrace_id, error, credential_id"
)


@dataclass(frozen=True)
class EventStatus:
    seq: int
    project_id: str
    user_id: str
    event_id: str
    event_name: str
    pixel_id: str
    status: str
    attempts: int
    next_at: float
    created_at: float
    updated_at: float
    fbtrace_id: str | None
    error: bytes | None
    credential_id: str | None

    def public(self, credential_status: str | None = None) -> dict[str, Any]:
        """What the status route and `events list --json` show: ids, state, Meta's answer;
        never the event's customer data. `held` shows as `queued` (it will be sent) with
        `held: true`. `credential_status` is its credential's (valid, invalid or removed)."""
        body: dict[str, Any] = {
            "event_id": self.event_id,
            "event_name": self.event_name,
            "pixel_id": self.pixel_id,
            "status": "queued" if self.status == "held" else self.status,
            "attempts": self.attempts,
            "accepted_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }
        if self.status == "held":
            body["held"] = True
        if self.status == "queued" and self.attempts:
            body["next_attempt_at"] = _iso(self.next_at)
        if self.fbtrace_id:
            body["fbtrace_id"] = self.fbtrace_id
        if self.error and self.status != "delivered":
            body["error"] = orjson.loads(self.error)
        if self.credential_id is not None:
            body["credential"] = {"id": self.credential_id}
            if credential_status is not None:
                body["credential"]["status"] = credential_status
        return body


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def event_status(
    db: Connection, project_id: str, user_id: str, event_id: str
) -> EventStatus | None:
    """The newest row of this user's event (a replay or a resend makes a new one)."""
    row = db.execute(
        f"SELECT {_STATUS_COLUMNS} FROM outbox WHERE project_id = ? AND event_id = ? "  # noqa: S608
        "AND user_id = ? ORDER BY seq DESC LIMIT 1",
        (project_id, event_id, user_id),
    ).fetchone()
    return None if row is None else EventStatus(*row)


def list_events(
    db: Connection,
    *,
    project_id: str | None = None,
    status: str | None = None,
    since: float | None = None,
    limit: int = 100,
) -> list[EventStatus]:
    """Newest first; `status` is one of STATUSES."""
    where, args = conditions(
        ("project_id = ?", project_id), ("status = ?", status), ("updated_at >= ?", since)
    )
    rows = db.execute(
        f"SELECT {_STATUS_COLUMNS} FROM outbox WHERE {where} ORDER BY seq DESC LIMIT ?",  # noqa: S608
        (*args, limit),
    ).fetchall()
    return [EventStatus(*row) for row in rows]


def stats(db: Connection, *, project_id: str | None = None) -> dict[str, Any]:
    """Counts by status, the oldest pending event's acceptance time, and per pixel."""
    by_status = dict.fromkeys(STATUSES, 0)
    pixels: dict[str, dict[str, Any]] = {}
    where, args = conditions(("project_id = ?", project_id))
    for pixel, status, count, oldest in db.execute(
        "SELECT pixel_id, status, count(*), min(created_at) FROM outbox "  # noqa: S608
        f"WHERE {where} GROUP BY pixel_id, status",
        args,
    ):
        by_status[status] = by_status.get(status, 0) + count
        entry = pixels.setdefault(pixel, {**dict.fromkeys(STATUSES, 0), "oldest_pending": None})
        entry[status] = count
        if status in PENDING and (
            entry["oldest_pending"] is None or oldest < entry["oldest_pending"]
        ):
            entry["oldest_pending"] = oldest
    oldest_all = [p["oldest_pending"] for p in pixels.values() if p["oldest_pending"] is not None]
    return {
        "by_status": by_status,
        "oldest_pending": min(oldest_all) if oldest_all else None,
        "pixels": pixels,
    }


def replay(
    db: Connection,
    *,
    now: float,
    project_id: str | None = None,
    event_ids: Sequence[str] = (),
    seqs: Sequence[int] = (),
    all_failed: bool = False,
    after_seq: int = 0,
    limit: int = 1000,
    dry_run: bool = False,
) -> list[EventStatus]:
    """Failed events (named, or all) queued again now with the same event_id and body; the
    rows replayed, as they were. A row a newer row of the same event supersedes (the caller
    sent it again) is left alone.

    Each call does at most `limit`: with `all_failed`, the failed rows after `after_seq` in
    seq order (pass the last seq returned to go on, so a long replay commits as it goes and
    never meets the rows it replayed again if they fail anew); with `event_ids`, the first
    `limit` ids, looked up in `project_id` (required: the index is (project_id, event_id));
    with `seqs`, those rows only (an event id may be several users' events). `dry_run` only
    reads."""
    newest = (
        "NOT EXISTS (SELECT 1 FROM outbox AS newer WHERE newer.project_id = outbox.project_id "
        "AND newer.event_id = outbox.event_id AND newer.user_id = outbox.user_id "
        "AND newer.seq > outbox.seq)"
    )
    if all_failed:
        where, args = conditions(("project_id = ?", project_id))
        rows = db.execute(
            f"SELECT {_STATUS_COLUMNS} FROM outbox WHERE seq > ? AND status = 'failed' "  # noqa: S608
            f"AND {where} AND {newest} ORDER BY seq LIMIT ?",
            (after_seq, *args, limit),
        ).fetchall()
    elif seqs:
        rows = []
        for seq in seqs[:limit]:
            rows += db.execute(
                f"SELECT {_STATUS_COLUMNS} FROM outbox WHERE seq = ? AND status = 'failed' "  # noqa: S608
                f"AND {newest}",
                (seq,),
            ).fetchall()
    else:
        if project_id is None and event_ids:
            raise ValueError("replaying events by id needs their project")
        rows = []
        for event_id in event_ids[:limit]:
            rows += db.execute(
                f"SELECT {_STATUS_COLUMNS} FROM outbox WHERE project_id = ? AND event_id = ? "  # noqa: S608
                f"AND status = 'failed' AND {newest} ORDER BY seq",
                (project_id, event_id),
            ).fetchall()
    replayed = [EventStatus(*row) for row in rows]
    if not dry_run:
        # The old error goes: a queued row with an error reads as "retrying" (status route).
        db.executemany(
            "UPDATE outbox SET status = 'queued', next_at = ?, attempts = 0, updated_at = ?, "
            "error = NULL WHERE seq = ? AND status = 'failed'",
            [(now, now, row.seq) for row in replayed],
        )
        if replayed:
            notify_due(db)
    return replayed


T = TypeVar("T")
_Insert = tuple[list[Row], "asyncio.Future[list[int]]"]


def _settle_inserts(job: asyncio.Future[list[int]], *, taken: list[_Insert]) -> None:
    """Each call of the statement gets its own seqs, or the error that failed them all."""
    if job.cancelled() or job.exception() is not None:
        error = job.exception() if not job.cancelled() else None
        for _, future in taken:
            if not future.done():
                future.set_exception(error or sqlite3.OperationalError("abandoned"))
        return
    seqs = job.result()
    start = 0
    for rows, future in taken:
        if not future.done():
            future.set_result(seqs[start : start + len(rows)])
        start += len(rows)


class Outbox:
    """The server's outbox, in either backend: writes through the group-commit writer, reads
    on a connection of their own. `pending` counts queued and held rows, kept in memory so the
    queue bound costs nothing per call (per process: several instances each count their own
    and recount from the table every minute)."""

    def __init__(self, database: Database | Path, *, clock: Callable[[], float]) -> None:
        """On `database`, or on the SQLite file at that path."""
        if isinstance(database, Path):
            database = SqliteDatabase(database)
        self.database = database
        try:
            if isinstance(database, SqliteDatabase):
                database.read_now(create_schema)
                database.read_now(idempotency.create_schema)
                database.read_now(minutes.create_schema)
                database.read_now(breakers.create_schema)
            self.pending = database.read_now(pending_count)
        except BaseException:
            database.close()
            raise
        database.start_writer()
        self.clock = clock
        # Inserts waiting for the writer (appended on the loop, taken in the writer's thread).
        self._lock = threading.Lock()
        self._inserts: list[tuple[list[Row], asyncio.Future[list[int]]]] = []
        self._insert_submitted = False
        self._notified = -NOTIFY_SECONDS  # when the writer last sent a NOTIFY (monotonic)

    def close(self) -> None:
        self.database.close()

    async def write(self, job: Callable[[Connection], T]) -> T:
        return await self.database.submit(job)

    async def read(self, job: Callable[[Connection], T]) -> T:
        """A read: on SQLite on the loop (only primary-key and index lookups belong here), on
        PostgreSQL in a worker thread."""
        return await read_for_caller(self.database, job)

    def read_now(self, job: Callable[[Connection], T]) -> T:
        """A read in the caller's thread, off the loop (the CLI, tests)."""
        return self.database.read_now(job)

    async def answers(self, *, timeout: float) -> bool:
        """Whether storage answers: a real read (one index lookup), and a writer alive whose
        last transaction committed. Only after a failed one does it write (an empty
        transaction, at most `timeout` seconds) to see whether the disk, the lock or the server
        has recovered; while healthy it costs the write path nothing."""
        try:
            async with asyncio.timeout(timeout):
                await self.database.read(next_due)
        except ERRORS_OR_TIMEOUT:
            return False
        if not self.database.alive:
            return False
        if self.database.failing:
            try:
                async with asyncio.timeout(timeout):
                    await self.write(lambda db: None)
            except ERRORS_OR_TIMEOUT:
                return False
        return True

    async def enqueue(
        self,
        events: Sequence[NewEvent],
        *,
        next_at: float | None = None,
        attempts: int = 0,
        error: dict[str, Any] | None = None,
    ) -> list[int]:
        """Durable once this returns: the seqs of the new rows.

        The calls waiting when the writer is free share one INSERT statement (and so one
        commit): far cheaper per event than a statement per call."""
        now = self.clock()
        rows = rows_of(events, now=now, next_at=now if next_at is None else next_at,
                       attempts=attempts, error=error)  # fmt: skip
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.pending += len(events)  # counted before the write: concurrent calls see it
        with self._lock:
            self._inserts.append((rows, future))
            submit, self._insert_submitted = not self._insert_submitted, True
        if submit:
            taken: list[_Insert] = []  # filled in the writer's thread, read once it is done
            job = self.database.submit(partial(self._insert_waiting, taken=taken))
            job.add_done_callback(partial(self._settle_inserts, taken=taken))
        try:
            return await future
        except ERRORS as exc:
            self.pending -= len(events)
            log("outbox_write_failed", logging.ERROR, error=type(exc).__name__)
            raise StorageUnavailable from None

    def _settle_inserts(self, job: asyncio.Future[list[int]], *, taken: list[_Insert]) -> None:
        """On the loop, once the writer is done with the job. A transaction that failed before
        the job ran (the lock held past the busy timeout) took no insert: the inserts waiting
        for it fail with its error, and the next enqueue submits a job of its own."""
        if not job.cancelled() and job.exception() is not None and not taken:
            with self._lock:
                taken += self._inserts
                self._inserts = []
                self._insert_submitted = False
        _settle_inserts(job, taken=taken)

    def _insert_waiting(self, db: Connection, *, taken: list[_Insert]) -> list[int]:
        """In the writer's thread: every insert waiting now, in one statement. On PostgreSQL
        the other instances' dispatchers hear of new events at most every NOTIFY_SECONDS (this
        one's is woken in process): PostgreSQL serialises the commits of transactions that
        notify, so a notice per insert would cost every instance's commits their overlap."""
        with self._lock:
            taken += self._inserts
            self._inserts = []
            self._insert_submitted = False
        seqs = insert(db, [row for rows, _ in taken for row in rows])
        if is_postgres(db) and (moment := time.monotonic()) - self._notified >= NOTIFY_SECONDS:
            self._notified = moment
            notify_due(db)
        return seqs

    def finished(self, count: int) -> None:
        """`count` pending rows became delivered or failed."""
        self.pending = max(0, self.pending - count)

    async def recount(self) -> None:
        """The pending count from the table: the CLI's replays happen in another process."""
        self.pending = await self.write(pending_count)
