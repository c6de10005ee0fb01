"""The database the server keeps its state in: one SQLite file (the embedded default) or a
PostgreSQL database several instances share (`[storage] url`, FUNNELGATE_DATABASE_URL).

Both are a `Database`: writes are jobs (functions of a connection) that the group-commit
writer runs and commits, reads are jobs run on a reading connection. The statements the jobs
run are the same on both (storage/postgres.py says how); `is_postgres(db)` tells a statement
which dialect it is on where they differ.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeGuard, TypeVar

import psycopg

from server.config import POSTGRES_SCHEMES
from server.errors import StorageUnavailable
from server.logs import log
from server.storage import postgres
from server.storage.postgres import PgConnection
from server.storage.writer import Writer, connect

T = TypeVar("T")
# Either backend's failures: the disk, a lock held too long, a server that went away.
ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
ERRORS_OR_TIMEOUT: tuple[type[Exception], ...] = (*ERRORS, TimeoutError)
Connection = Any  # sqlite3.Connection or PgConnection: what storage/*.py statements take


def is_postgres(db: Connection) -> bool:
    return isinstance(db, PgConnection)


def is_postgres_url(url: str | None) -> TypeGuard[str]:
    return url is not None and url.startswith(POSTGRES_SCHEMES)


class Database(Protocol):
    @property
    def alive(self) -> bool:
        """Whether the writer still takes jobs."""

    @property
    def failing(self) -> bool:
        """The last write transaction failed as a whole (cleared by the next that commits)."""

    def submit(self, job: Callable[[Connection], T]) -> asyncio.Future[T]:
        """`job` runs in the next write transaction; the future settles once it committed."""

    async def read(self, job: Callable[[Connection], T]) -> T:
        """`job` on a reading connection, never holding the event loop on the network."""

    def read_now(self, job: Callable[[Connection], T]) -> T:
        """`job` in the caller's thread (start-up, or a thread of the caller's own)."""

    def start_writer(self) -> None:
        """Writes may begin (the schema is in place)."""

    def listen(self, wake: Callable[[], None]) -> None:
        """`wake` is called when another process queued or replayed events."""

    def close(self) -> None: ...


class SqliteDatabase:
    """One file in WAL mode: one writer thread, one reading connection used on the loop
    (local index lookups take microseconds and WAL readers never wait for the writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._read = connect(path)
        self._writer: Writer | None = None

    def start_writer(self) -> None:
        """After the schema is in place (outbox.py creates it on the reading connection)."""
        self._writer = Writer(self.path)

    @property
    def alive(self) -> bool:
        return self._writer is not None and self._writer.alive

    @property
    def failing(self) -> bool:
        return self._writer is not None and self._writer.failing

    def submit(self, job: Callable[[Connection], T]) -> asyncio.Future[T]:
        assert self._writer is not None
        return self._writer.submit(job)

    async def read(self, job: Callable[[Connection], T]) -> T:
        return job(self._read)

    def read_now(self, job: Callable[[Connection], T]) -> T:
        return job(self._read)

    def listen(self, wake: Callable[[], None]) -> None:
        """Other processes' events are found by the dispatcher's poll (one file: one host)."""

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._read.close()


class PostgresDatabase:
    def __init__(self, url: str) -> None:
        self.url = url
        self._readers = postgres.Readers(url)
        self._writer = postgres.PgWriter(url)
        self._listener: postgres.Listener | None = None

    def start_writer(self) -> None:
        """The writer connects on its first job."""

    @property
    def alive(self) -> bool:
        return self._writer.alive

    @property
    def failing(self) -> bool:
        return self._writer.failing

    def submit(self, job: Callable[[Connection], T]) -> asyncio.Future[T]:
        return self._writer.submit(job)

    async def read(self, job: Callable[[Connection], T]) -> T:
        return await self._readers.read(job)

    def read_now(self, job: Callable[[Connection], T]) -> T:
        """A read in the caller's thread (start-up, before the loop serves)."""
        return self._readers.read_now(job)

    def listen(self, wake: Callable[[], None]) -> None:
        self._listener = postgres.Listener(self.url, wake)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self._writer.close()
        self._readers.close()


def open_database(path: Path, url: str | None) -> SqliteDatabase | PostgresDatabase:
    return (
        PostgresDatabase(url) if url is not None and is_postgres_url(url) else SqliteDatabase(path)
    )


def connect_sync(path: Path, url: str | None) -> Connection:
    """A connection of its own (the CLI): autocommit, transactions are the caller's BEGINs."""
    return postgres.connect(url) if is_postgres_url(url) else connect(path)


async def read_for_caller(database: Database, job: Callable[[Connection], T]) -> T:
    """A read a caller waits on: the backend's failure becomes the documented 503
    STORAGE_UNAVAILABLE (logged by its type only)."""
    try:
        return await database.read(job)
    except ERRORS as exc:
        log("storage_read_failed", logging.ERROR, error=type(exc).__name__)
        raise StorageUnavailable(reading=True) from None


def conditions(*pairs: tuple[str, Any]) -> tuple[str, list[Any]]:
    """The conditions whose value is given (not None), ANDed ("TRUE" when none is), and their
    values: a filter left out is not in the statement, so each backend plans for the filters
    present (and PostgreSQL never meets an untyped `? IS NULL`)."""
    used = [(sql, value) for sql, value in pairs if value is not None]
    return " AND ".join(sql for sql, _ in used) or "TRUE", [value for _, value in used]


def first_line(exc: BaseException) -> str:
    """An error's first line, for a message (a driver's may go on with context lines)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
