"""The `idempotency` table: Run Tool's stored answers by (project, user, key hash), kept
24 h (server/idempotency.py says what is stored and why)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from server.storage.database import Connection
from server.storage.writer import PRUNE_BATCH

KEY_TTL_SECONDS = 24 * 3600  # how long a key holds (README, Idempotency-Key)
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS idempotency (
    project_id   TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    key          TEXT NOT NULL,  -- SHA-256 (hex) of the key as the caller sent it
    fingerprint  TEXT NOT NULL,  -- SHA-256 (hex) of the tool name and the parameters
    status       INTEGER NOT NULL,
    content_type TEXT,
    headers      BLOB NOT NULL,  -- JSON: {lowercase name: value} of KEPT_HEADERS
    body         BLOB NOT NULL,
    created_at   REAL NOT NULL,
    PRIMARY KEY (project_id, user_id, key)
)""",
    "CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at)",
)


@dataclass(frozen=True)
class Stored:
    """One answer as it is replayed."""

    fingerprint: str
    status: int
    content_type: str | None
    headers: dict[str, str]
    body: bytes
    created_at: float


def create_schema(db: Connection) -> None:
    for statement in SCHEMA:  # not executescript: it would COMMIT a writer's transaction
        db.execute(statement)


def lookup(
    db: Connection, project_id: str, user_id: str, key_hash: str, *, since: float
) -> Stored | None:
    """The answer stored for the key at or after `since` (older ones have expired)."""
    row = db.execute(
        "SELECT fingerprint, status, content_type, headers, body, created_at FROM idempotency "
        "WHERE project_id = ? AND user_id = ? AND key = ? AND created_at >= ?",
        (project_id, user_id, key_hash, since),
    ).fetchone()
    if row is None:
        return None
    fp, status, content_type, headers, body, created_at = row
    return Stored(fp, status, content_type, orjson.loads(headers), bytes(body), created_at)


RUNNING = 0  # the status of a key whose call runs (on this instance or another)
# A key's running mark outlives its call by this much at most (an instance that died mid-call
# leaves one): past it, a retry runs the call again, safely (its event ids are the same).
RUNNING_SECONDS = 60.0


def claim(
    db: Connection, project_id: str, user_id: str, key_hash: str, fingerprint: str, *, now: float
) -> Stored | None:
    """Marks the key running for this call, in the write transaction: None when this call
    may run; else the key's row (its answer, or status RUNNING: another call runs with it,
    on any instance). A row expired (24 h) or a running mark gone stale is taken over."""
    taken = db.execute(
        "INSERT INTO idempotency (project_id, user_id, key, fingerprint, status, content_type, "
        "headers, body, created_at) VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?) "
        "ON CONFLICT (project_id, user_id, key) DO UPDATE SET fingerprint = "
        "excluded.fingerprint, status = excluded.status, content_type = NULL, "
        "headers = excluded.headers, body = excluded.body, created_at = excluded.created_at "
        "WHERE idempotency.created_at < ? OR (idempotency.status = ? AND "
        "idempotency.created_at < ?) RETURNING status",
        (project_id, user_id, key_hash, fingerprint, RUNNING, b"{}", b"", now,
         now - KEY_TTL_SECONDS, RUNNING, now - RUNNING_SECONDS),
    ).fetchone()  # fmt: skip
    if taken is not None:
        return None
    return lookup(db, project_id, user_id, key_hash, since=now - KEY_TTL_SECONDS)


def release(db: Connection, project_id: str, user_id: str, key_hash: str) -> None:
    """The call ended with nothing to keep: the running mark goes, and a retry runs again."""
    db.execute(
        "DELETE FROM idempotency WHERE project_id = ? AND user_id = ? AND key = ? AND status = ?",
        (project_id, user_id, key_hash, RUNNING),
    )


def save(db: Connection, project_id: str, user_id: str, key_hash: str, stored: Stored) -> None:
    """The call's answer in place of its running mark (or of an expired row); a live answer
    is replayed, never overwritten, even by a call that ran at once on another instance."""
    db.execute(
        "INSERT INTO idempotency (project_id, user_id, key, fingerprint, status, "
        "content_type, headers, body, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (project_id, user_id, key) DO UPDATE SET fingerprint = "
        "excluded.fingerprint, status = excluded.status, content_type = excluded.content_type, "
        "headers = excluded.headers, body = excluded.body, created_at = excluded.created_at "
        "WHERE idempotency.status = ? OR idempotency.created_at < excluded.created_at - ?",
        (
            project_id,
            user_id,
            key_hash,
            stored.fingerprint,
            stored.status,
            stored.content_type,
            orjson.dumps(stored.headers),
            stored.body,
            stored.created_at,
            RUNNING,
            KEY_TTL_SECONDS,
        ),
    )


def prune(db: Connection, *, before: float, limit: int = PRUNE_BATCH) -> int:
    """Deletes up to `limit` rows stored before `before` (the retention loop passes
    now - KEY_TTL_SECONDS); the number deleted."""
    return int(
        db.execute(
            "DELETE FROM idempotency WHERE (project_id, user_id, key) IN (SELECT project_id, "
            "user_id, key FROM idempotency WHERE created_at < ? LIMIT ?)",
            (before, limit),
        ).rowcount
    )
