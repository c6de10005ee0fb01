"""The console's reads of the outbox: rows, a page's worth at most, found through an index.
Numbers (per minute, per pixel, coverage) come from the counters (storage/minutes.py),
never from here.

Reads run on a connection of their own in a worker thread (`Reader`), so a page never holds
the event loop nor waits on the writer (WAL readers do not block on it). Writes (a replay) go
through the outbox's writer like every other.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson

from server.storage.database import Connection, Database, SqliteDatabase, conditions, is_postgres
from server.storage.outbox import EventStatus
from server.storage.writer import connect

T = TypeVar("T")
_COLUMNS = ", ".join(field.name for field in dataclasses.fields(EventStatus))
MAX_READERS = 4  # console reads at once; the others wait their turn


class Reader:
    def __init__(self, database: Callable[[], Database]) -> None:
        self._database = database  # the server's, once its lifespan has opened it
        self._slots = asyncio.Semaphore(MAX_READERS)

    async def __call__(self, job: Callable[[Connection], T]) -> T:
        database = self._database()
        async with self._slots:
            if isinstance(database, SqliteDatabase):
                return await asyncio.to_thread(self._run, database.path, job)
            return await database.read(job)

    @staticmethod
    def _run(path: Path, job: Callable[[Connection], T]) -> T:
        db = connect(path)
        try:
            db.execute("PRAGMA query_only = 1")
            return job(db)
        finally:
            db.close()


def failed(
    db: Connection,
    *,
    project_id: str | None = None,
    pixel_id: str | None = None,
    code: str | None = None,
    limit: int,
) -> list[EventStatus]:
    """Failed rows, most recently failed first. The repeated status condition is the
    `outbox_done` index's own, so SQLite walks that index rather than the table."""
    error_code = (
        "convert_from(error, 'UTF8')::jsonb ->> 'code' = ?"
        if is_postgres(db)
        else "json_extract(CAST(error AS TEXT), '$.code') = ?"
    )
    where, args = conditions(
        ("project_id = ?", project_id), ("pixel_id = ?", pixel_id), (error_code, code)
    )
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM outbox WHERE status IN ('delivered', 'failed') "  # noqa: S608
        f"AND status = 'failed' AND {where} ORDER BY updated_at DESC, seq DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [EventStatus(*row) for row in rows]


class Stored(NamedTuple):
    """One outbox row with the event as Meta receives it."""

    status: EventStatus
    event: dict[str, Any]
    test_event_code: str | None


def stored(db: Connection, seq: int) -> Stored | None:
    row = db.execute(
        f"SELECT {_COLUMNS}, event, test_event_code FROM outbox WHERE seq = ?",  # noqa: S608
        (seq,),
    ).fetchone()
    if row is None:
        return None
    event = orjson.loads(row[-2])
    return Stored(EventStatus(*row[:-2]), event if isinstance(event, dict) else {}, row[-1])


def by_seq(db: Connection, seqs: Sequence[int]) -> list[EventStatus]:
    """The rows `seqs` name, in that order (those that no longer exist are left out)."""
    found = {}
    for seq in seqs:
        row = db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE seq = ?", (seq,)).fetchone()  # noqa: S608
        if row is not None:
            found[seq] = EventStatus(*row)
    return [found[seq] for seq in seqs if seq in found]


def lookup(
    db: Connection, project_ids: Sequence[str], event_id: str, *, limit: int
) -> list[EventStatus]:
    """Every row of the event in these projects, whoever sent it, newest first."""
    rows: list[EventStatus] = []
    for project_id in project_ids:
        rows += [
            EventStatus(*row)
            for row in db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE project_id = ? AND event_id = ? "  # noqa: S608
                "ORDER BY seq DESC LIMIT ?",
                (project_id, event_id, limit),
            )
        ]
    rows.sort(key=lambda row: row.seq, reverse=True)
    return rows[:limit]


class Failure(NamedTuple):
    code: str
    message: str  # funnelgate's
    meta_message: str  # Meta's own words, when Meta answered
    fbtrace_id: str


def failure(row: EventStatus) -> Failure:
    """What a row's error says (empty strings where it says nothing)."""
    error: Any = {}
    if row.error and row.status != "delivered":
        try:
            error = orjson.loads(row.error)
        except orjson.JSONDecodeError:
            error = {}
    if not isinstance(error, dict):
        error = {}
    upstream = error.get("upstream")
    upstream = upstream if isinstance(upstream, dict) else {}
    meta = upstream.get("error_user_msg") or upstream.get("message") or ""
    trace = upstream.get("fbtrace_id") or row.fbtrace_id or ""
    return Failure(str(error.get("code", "")), str(error.get("message", "")), str(meta), str(trace))
