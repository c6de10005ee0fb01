"""Per-minute counters: what the console charts, kept as events change state rather than
computed by scanning the outbox (server/tally.py counts in memory and adds here every few
seconds).

`minute` is the minute's first second (unix seconds). Match-key coverage counts the events
accepted that carry a key of Meta's customer information parameters
(https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters):
`ip_ua` both `client_ip_address` and `client_user_agent`, `only_ip_ua` nothing but those two,
`other_keys` any key not counted on its own, `none` no key at all. Retries are counted by
pixel only (a retried row's event name is not at hand), under the event name "".
"""

from __future__ import annotations

from typing import Any, NamedTuple

from server.storage.database import Connection, conditions
from server.storage.writer import PRUNE_BATCH

KEYS = ("em", "ph", "external_id", "fbc", "fbp")  # counted one by one
COUNTS = ("accepted", "delivered", "failed", "retried")
COVERAGE = (*KEYS, "ip_ua", "only_ip_ua", "other_keys", "none")
EVENT_COLUMNS = (*COUNTS, *COVERAGE)

SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS minute_events (
    minute     INTEGER NOT NULL,
    project_id TEXT NOT NULL,
    pixel_id   TEXT NOT NULL,
    event_name TEXT NOT NULL,
    {", ".join(f"{column} INTEGER NOT NULL DEFAULT 0" for column in EVENT_COLUMNS)},
    PRIMARY KEY (minute, project_id, pixel_id, event_name)
)""",
    """CREATE TABLE IF NOT EXISTS minute_sources (
    minute        INTEGER NOT NULL,
    project_id    TEXT NOT NULL,
    pixel_id      TEXT NOT NULL,
    event_name    TEXT NOT NULL,
    action_source TEXT NOT NULL,
    accepted      INTEGER NOT NULL,
    PRIMARY KEY (minute, project_id, pixel_id, event_name, action_source)
)""",
    """CREATE TABLE IF NOT EXISTS minute_failures (
    minute     INTEGER NOT NULL,
    project_id TEXT NOT NULL,
    pixel_id   TEXT NOT NULL,
    code       TEXT NOT NULL,
    failed     INTEGER NOT NULL,
    PRIMARY KEY (minute, project_id, pixel_id, code)
)""",
)
_KEYS = {  # each table's primary key
    "minute_events": "minute, project_id, pixel_id, event_name",
    "minute_sources": "minute, project_id, pixel_id, event_name, action_source",
    "minute_failures": "minute, project_id, pixel_id, code",
}

EventKey = tuple[int, str, str, str]  # (minute, project, pixel, event name)
SourceKey = tuple[int, str, str, str, str]  # ... and action source
FailureKey = tuple[int, str, str, str]  # (minute, project, pixel, code)


class MinuteCounts(NamedTuple):
    minute: int
    accepted: int
    delivered: int
    failed: int
    retried: int


class PixelCounts(NamedTuple):
    project_id: str
    pixel_id: str
    accepted: int
    delivered: int
    failed: int


class Coverage(NamedTuple):
    """Of `total` accepted events, how many carry each key."""

    event_name: str  # "*": all event names together
    total: int
    em: int
    ph: int
    external_id: int
    fbc: int
    fbp: int
    ip_ua: int
    only_ip_ua: int
    other_keys: int
    none: int


def create_schema(db: Connection) -> None:
    for statement in SCHEMA:  # not executescript: it would COMMIT a writer's transaction
        db.execute(statement)


def add(
    db: Connection,
    events: dict[EventKey, list[int]],
    sources: dict[SourceKey, int],
    failures: dict[FailureKey, int],
) -> None:
    """Adds counts to what the minutes already hold (`events`' lists in EVENT_COLUMNS order).

    Rows go in key order: instances adding to the same minutes at once on PostgreSQL then
    lock them in one order and wait for each other rather than deadlock ("acquire locks on
    multiple objects in a consistent order",
    https://www.postgresql.org/docs/current/explicit-locking.html#LOCKING-DEADLOCKS)."""
    columns = ", ".join(EVENT_COLUMNS)
    adding = ", ".join(f"{c} = minute_events.{c} + excluded.{c}" for c in EVENT_COLUMNS)
    db.executemany(
        f"INSERT INTO minute_events (minute, project_id, pixel_id, event_name, {columns}) "  # noqa: S608
        f"VALUES (?, ?, ?, ?, {', '.join('?' * len(EVENT_COLUMNS))}) "
        f"ON CONFLICT (minute, project_id, pixel_id, event_name) DO UPDATE SET {adding}",
        [(*key, *counts) for key, counts in sorted(events.items())],
    )
    db.executemany(
        "INSERT INTO minute_sources VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT "
        "(minute, project_id, pixel_id, event_name, action_source) "
        "DO UPDATE SET accepted = minute_sources.accepted + excluded.accepted",
        [(*key, count) for key, count in sorted(sources.items())],
    )
    db.executemany(
        "INSERT INTO minute_failures VALUES (?, ?, ?, ?, ?) ON CONFLICT "
        "(minute, project_id, pixel_id, code) "
        "DO UPDATE SET failed = minute_failures.failed + excluded.failed",
        [(*key, count) for key, count in sorted(failures.items())],
    )


def prune(db: Connection, *, before: float, limit: int = PRUNE_BATCH) -> int:
    """Deletes up to `limit` rows of minutes before `before` from each table."""
    return sum(
        db.execute(
            f"DELETE FROM {table} WHERE ({key}) IN "  # noqa: S608 - names are constants
            f"(SELECT {key} FROM {table} WHERE minute < ? LIMIT ?)",
            (before, limit),
        ).rowcount
        for table, key in _KEYS.items()
    )


def _scope(project_id: str | None, pixel_id: str | None) -> tuple[str, list[Any]]:
    """One project and one pixel, or all of them."""
    return conditions(("project_id = ?", project_id), ("pixel_id = ?", pixel_id))


def series(
    db: Connection,
    since: float,
    until: float,
    project_id: str | None = None,
    pixel_id: str | None = None,
) -> list[MinuteCounts]:
    """Per minute with data in [since, until), oldest first."""
    scope, args = _scope(project_id, pixel_id)
    rows = db.execute(
        "SELECT minute, sum(accepted), sum(delivered), sum(failed), sum(retried) "  # noqa: S608
        f"FROM minute_events WHERE minute >= ? AND minute < ? AND {scope} "
        "GROUP BY minute ORDER BY minute",
        (since, until, *args),
    ).fetchall()
    return [MinuteCounts._make(row) for row in rows]


def pixels(db: Connection, since: float) -> list[PixelCounts]:
    """Each pixel's counts since `since`, busiest first."""
    rows = db.execute(
        "SELECT project_id, pixel_id, sum(accepted), sum(delivered), sum(failed) "
        "FROM minute_events WHERE minute >= ? GROUP BY project_id, pixel_id "
        "ORDER BY sum(accepted) + sum(delivered) + sum(failed) DESC, project_id, pixel_id",
        (since,),
    ).fetchall()
    return [PixelCounts._make(row) for row in rows]


_COVERAGE_SUMS = ", ".join(f"sum({c})" for c in COVERAGE)


def coverage(db: Connection, since: float, project_id: str, pixel_id: str) -> list[Coverage]:
    """Per event name (most accepted first), then `*` for all of them; names with no accepted
    event are left out."""
    rows = db.execute(
        f"SELECT event_name, sum(accepted), {_COVERAGE_SUMS} FROM minute_events "  # noqa: S608
        "WHERE minute >= ? AND project_id = ? AND pixel_id = ? AND accepted > 0 "
        "GROUP BY event_name ORDER BY sum(accepted) DESC, event_name",
        (since, project_id, pixel_id),
    ).fetchall()
    if not rows:
        return []
    named = [Coverage._make(row) for row in rows]
    sums = [sum(row[i] for row in rows) for i in range(1, len(Coverage._fields))]
    return [*named, Coverage("*", *sums)]


def coverage_series(
    db: Connection, since: float, until: float, project_id: str, pixel_id: str
) -> list[tuple[int, Coverage]]:
    """All event names together, per minute with accepted events, oldest first."""
    rows = db.execute(
        f"SELECT minute, sum(accepted), {_COVERAGE_SUMS} FROM minute_events "  # noqa: S608
        "WHERE minute >= ? AND minute < ? AND project_id = ? AND pixel_id = ? AND accepted > 0 "
        "GROUP BY minute ORDER BY minute",
        (since, until, project_id, pixel_id),
    ).fetchall()
    return [(row[0], Coverage("*", *row[1:])) for row in rows]


def sources(
    db: Connection, since: float, project_id: str, pixel_id: str
) -> list[tuple[str, str, int]]:
    """(event name, action source, accepted), most first."""
    rows = db.execute(
        "SELECT event_name, action_source, sum(accepted) FROM minute_sources "
        "WHERE minute >= ? AND project_id = ? AND pixel_id = ? "
        "GROUP BY event_name, action_source ORDER BY sum(accepted) DESC, event_name, action_source",
        (since, project_id, pixel_id),
    ).fetchall()
    return [(name, source, count) for name, source, count in rows]


def failure_codes(
    db: Connection,
    since: float,
    project_id: str | None = None,
    pixel_id: str | None = None,
) -> list[tuple[str, int]]:
    """(code, failed events), most first."""
    scope, args = _scope(project_id, pixel_id)
    rows = db.execute(
        "SELECT code, sum(failed) FROM minute_failures WHERE minute >= ? "  # noqa: S608
        f"AND {scope} GROUP BY code ORDER BY sum(failed) DESC, code",
        (since, *args),
    ).fetchall()
    return [(code, count) for code, count in rows]
