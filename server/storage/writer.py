"""Group commit: one thread owns the write connection, and every write waiting when it is free
runs in one transaction, so many calls share one fsync.

A caller's `await writer.run(job)` returns only after the transaction holding its job has
committed; with `synchronous=FULL` in WAL mode that commit has reached the disk
(https://www.sqlite.org/pragma.html#pragma_synchronous). Each job runs inside its own
SAVEPOINT: a job that raises is rolled back alone, and the others in its batch still commit.
SQLite releases the GIL while it steps and syncs, so the event loop keeps running meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Job = Callable[[Any], Any]  # a function of a connection, either backend's
Waiting = tuple[Job, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]
Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]
BUSY_TIMEOUT_MS = 5000  # how long a connection waits for another's lock
# Jobs per transaction: bounds how long one commit keeps the others waiting.
MAX_JOBS_PER_COMMIT = 512
# Rows one pruning statement deletes at most: a clean-up never holds the writer for long.
PRUNE_BATCH = 5000
_STOP = None


def connect(path: Path, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """A connection to the database file in WAL mode; autocommit unless a job says BEGIN."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        into_wal(db)
        db.execute(f"PRAGMA synchronous={synchronous}")
    except BaseException:
        db.close()
        raise
    return db


def into_wal(db: sqlite3.Connection) -> None:
    """WAL mode (the file's own once set). Processes starting at once on a new file all set
    it, and SQLite may answer one "database is locked" at once rather than wait, where waiting
    could deadlock (https://www.sqlite.org/c3ref/busy_handler.html): it tries again, for as
    long as the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class GroupCommit:
    """A thread that owns a write connection and commits the jobs waiting in batches; each
    backend's writer says how a batch commits (`_commit`) and how its connection closes."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Waiting | None] = queue.SimpleQueue()
        # The last transaction failed as a whole (the disk, the lock held too long, the server
        # gone); the next that commits clears it. Read by the readiness probe, at no cost.
        self.failing = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    async def run(self, job: Callable[[Any], T]) -> T:
        """`job(connection)`'s result, once the transaction that ran it is committed."""
        return await self.submit(job)

    def submit(self, job: Callable[[Any], T]) -> asyncio.Future[T]:
        """The same, as a future (for callers that settle others' futures from it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((job, loop, future))
        return future

    @property
    def alive(self) -> bool:
        """Whether its thread still takes jobs (it stops on close())."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Commits what is queued, then closes the connection."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._close_connection()

    def _close_connection(self) -> None:
        raise NotImplementedError

    def _commit(self, batch: list[Waiting]) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_JOBS_PER_COMMIT:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return


class Writer(GroupCommit):
    """SQLite's: each job in a SAVEPOINT of the batch's transaction, so a job that raises is
    rolled back alone."""

    def __init__(self, path: Path) -> None:
        super().__init__("funnelgate-writer")
        self._db = connect(path)
        # Writers of several processes (serve --workers N) take turns through this lock: SQLite
        # has no queue for its write lock, and a writer that finds it taken sleeps and retries,
        # so two busy processes would wait on each other's polls (p99 of seconds, README).
        self._turn = os.open(path.with_name(path.name + "-writer.lock"), os.O_RDWR | os.O_CREAT,
                             0o600)  # fmt: skip
        self._thread.start()

    def _close_connection(self) -> None:
        self._db.close()
        os.close(self._turn)

    def _commit(self, batch: list[Waiting]) -> None:
        outcomes: list[Outcome] = []
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for job, _, future in batch:
                self._db.execute("SAVEPOINT job")
                try:
                    result = job(self._db)
                except Exception as exc:
                    self._db.execute("ROLLBACK TO job")
                    outcomes.append((future, None, exc))
                else:
                    outcomes.append((future, result, None))
                self._db.execute("RELEASE job")
            self._db.execute("COMMIT")
            self.failing = False
        except sqlite3.Error as exc:  # the disk or the lock failed: nothing of the batch holds
            self.failing = True
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            outcomes = [(future, None, exc) for _, _, future in batch]
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)
        settle(batch, outcomes)


def settle(batch: list[Waiting], outcomes: list[Outcome]) -> None:
    """Each job's future gets its outcome, on the loop that waits for it."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
    for (_, loop, _), outcome in zip(batch, outcomes, strict=True):
        by_loop.setdefault(loop, []).append(outcome)
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop closed: no one is waiting
            loop.call_soon_threadsafe(_settle_all, settled)


def _settle_all(settled: list[Outcome]) -> None:
    for future, result, error in settled:
        if future.done():  # its caller was cancelled meanwhile; the write stands
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
