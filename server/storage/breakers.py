"""The `breakers` table: throttling backoff every instance on the database shares
(delivery/shared_backoff.py). A row is a breaker some instance opened: the SHA-256 of its
(access token, pixel) key, never the token, and until when it is open."""

from __future__ import annotations

from server.delivery.throttle import Change, Shared
from server.storage.database import Connection

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS breakers (
    key        TEXT PRIMARY KEY,  -- SHA-256 (hex) of the access token and the pixel id
    pixel_id   TEXT NOT NULL,
    open_until REAL NOT NULL,
    failures   INTEGER NOT NULL,
    owner      TEXT NOT NULL      -- the instance that opened it, and probes it
)""",
)
# What is left of a closed interval this long after it ended goes.
KEEP_SECONDS = 3600.0
# Intervals that ended this recently are still read: their opener may be probing.
RECENT_SECONDS = 60.0


def create_schema(db: Connection) -> None:
    for statement in SCHEMA:
        db.execute(statement)


def share(db: Connection, changes: list[Change], owner: str) -> None:
    """Breakers `owner` opened (kept while they open longest, with who opened the longest),
    and closed (deleted). In key order: two instances sharing at once lock the rows in the
    same order, so on PostgreSQL one waits for the other instead of deadlocking."""
    last = {change[0]: change for change in changes}  # in order: a key's last change stands
    opened = sorted((*c, owner) for c in last.values() if c[2] > 0)
    closed = sorted((c[0],) for c in last.values() if c[2] == 0)
    db.executemany(
        "INSERT INTO breakers (key, pixel_id, open_until, failures, owner) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET open_until = "
        "excluded.open_until, failures = excluded.failures, owner = excluded.owner "
        "WHERE breakers.open_until < excluded.open_until",
        opened,
    )
    db.executemany("DELETE FROM breakers WHERE key = ?", closed)


def recent(db: Connection, now: float) -> list[Shared]:
    """Breakers open at `now`, or whose interval ended in the last RECENT_SECONDS (their
    opener may be probing): a handful, one per throttled pixel and token."""
    rows = db.execute(
        "SELECT key, pixel_id, open_until, failures, owner FROM breakers WHERE open_until > ?",
        (now - RECENT_SECONDS,),
    ).fetchall()
    return [(key, pixel, float(until), int(failures), owner)
            for key, pixel, until, failures, owner in rows]  # fmt: skip


def prune(db: Connection, *, before: float) -> int:
    return int(db.execute("DELETE FROM breakers WHERE open_until < ?", (before,)).rowcount)
