"""PostgreSQL's schema, as numbered migrations: each is applied once, in order, in one
transaction with the version it brings.

Several instances may start at once: `upgrade` takes a transaction-level advisory lock first
(https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS), so one applies
the migrations and the others, once it commits, find them done. A database a newer funnelgate
upgraded is refused rather than written with older statements.

The tables mirror SQLite's (storage/outbox.py, credentials.py, idempotency.py, minutes.py) with
PostgreSQL's types: times are unix seconds (float8 where SQLite keeps REAL), JSON and sealed
tokens are bytea, the outbox's seq an identity column.
"""

from __future__ import annotations

from server.errors import ConfigError
from server.storage.database import Connection
from server.storage.minutes import EVENT_COLUMNS

# Any number unlikely to be another application's: "funnelgate" read as digits, in a bigint.
LOCK_ID = 0x66756E6E656C
_COUNTS = ", ".join(f"{column} integer NOT NULL DEFAULT 0" for column in EVENT_COLUMNS)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: credentials, the outbox, idempotency keys, per-minute counters (funnelgate 0.4).
    (
        """CREATE TABLE credentials (
            project_id    text NOT NULL,
            credential_id text NOT NULL,
            user_id       text NOT NULL,
            external_id   text,
            label         text,
            is_default    boolean NOT NULL,
            status        text NOT NULL,
            status_error  bytea,
            key_id        text NOT NULL,
            sealed_token  bytea NOT NULL,
            created_at    bigint NOT NULL,
            updated_at    bigint NOT NULL,
            last_used_at  bigint,
            PRIMARY KEY (project_id, credential_id)
        )""",
        "CREATE INDEX credentials_by_key ON credentials (key_id)",
        "CREATE INDEX credentials_by_user ON credentials (project_id, user_id)",
        "CREATE UNIQUE INDEX credentials_default ON credentials (project_id, user_id) "
        "WHERE is_default",
        "CREATE UNIQUE INDEX credentials_external ON credentials "
        "(project_id, user_id, external_id) WHERE external_id IS NOT NULL",
        """CREATE TABLE outbox (
            seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            project_id      text NOT NULL,
            user_id         text NOT NULL,
            event_id        text NOT NULL,
            event_name      text NOT NULL,
            pixel_id        text NOT NULL,
            test_event_code text,
            expires_at      float8 NOT NULL,
            status          text NOT NULL,
            attempts        integer NOT NULL,
            next_at         float8 NOT NULL,
            created_at      float8 NOT NULL,
            updated_at      float8 NOT NULL,
            fbtrace_id      text,
            error           bytea,
            event           bytea NOT NULL,
            credential_id   text
        )""",
        "CREATE INDEX outbox_due ON outbox (next_at) WHERE status = 'queued'",
        "CREATE INDEX outbox_event ON outbox (project_id, event_id)",
        "CREATE INDEX outbox_held_credential ON outbox (project_id, credential_id) "
        "WHERE status = 'held'",
        "CREATE INDEX outbox_done ON outbox (updated_at) WHERE status IN ('delivered', 'failed')",
        "CREATE INDEX outbox_pending_age ON outbox (created_at) WHERE status IN ('queued', 'held')",
        "CREATE INDEX outbox_failed ON outbox (updated_at) WHERE status = 'failed'",
        """CREATE TABLE idempotency (
            project_id   text NOT NULL,
            user_id      text NOT NULL,
            key          text NOT NULL,
            fingerprint  text NOT NULL,
            status       integer NOT NULL,
            content_type text,
            headers      bytea NOT NULL,
            body         bytea NOT NULL,
            created_at   float8 NOT NULL,
            PRIMARY KEY (project_id, user_id, key)
        )""",
        "CREATE INDEX idempotency_created ON idempotency (created_at)",
        f"""CREATE TABLE minute_events (
            minute     bigint NOT NULL,
            project_id text NOT NULL,
            pixel_id   text NOT NULL,
            event_name text NOT NULL,
            {_COUNTS},
            PRIMARY KEY (minute, project_id, pixel_id, event_name)
        )""",
        """CREATE TABLE minute_sources (
            minute        bigint NOT NULL,
            project_id    text NOT NULL,
            pixel_id      text NOT NULL,
            event_name    text NOT NULL,
            action_source text NOT NULL,
            accepted      integer NOT NULL,
            PRIMARY KEY (minute, project_id, pixel_id, event_name, action_source)
        )""",
        """CREATE TABLE minute_failures (
            minute     bigint NOT NULL,
            project_id text NOT NULL,
            pixel_id   text NOT NULL,
            code       text NOT NULL,
            failed     integer NOT NULL,
            PRIMARY KEY (minute, project_id, pixel_id, code)
        )""",
    ),
    # 2: throttling backoff shared by the instances (storage/breakers.py).
    (
        """CREATE TABLE breakers (
            key        text PRIMARY KEY,
            pixel_id   text NOT NULL,
            open_until float8 NOT NULL,
            failures   integer NOT NULL,
            owner      text NOT NULL
        )""",
    ),
)
VERSION = len(MIGRATIONS)


def version(db: Connection) -> int:
    """The schema version of the database (0: none yet)."""
    exists = db.execute("SELECT to_regclass('funnelgate_schema') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    row = db.execute("SELECT version FROM funnelgate_schema").fetchone()
    return 0 if row is None else int(row[0])


def upgrade(db: Connection) -> tuple[int, int]:
    """Applies the migrations the database lacks; (version before, version after). A database
    already current is only read: a role without CREATE rights serves it."""
    current = version(db)
    if current == VERSION:
        return current, current
    db.execute("BEGIN")
    try:
        # A migration (or the wait for another instance's) may outlast the statement timeout
        # every connection has (postgres.py): this transaction has none.
        db.execute("SET LOCAL statement_timeout = 0")
        db.execute("SELECT pg_advisory_xact_lock(?)", (LOCK_ID,))
        db.execute("CREATE TABLE IF NOT EXISTS funnelgate_schema (version integer NOT NULL)")
        before = version(db)
        if before > VERSION:
            raise ConfigError(
                f"the database has schema version {before}, made by a newer funnelgate: "
                "upgrade funnelgate"
            )
        for statements in MIGRATIONS[before:]:
            for statement in statements:
                db.execute(statement)
        if before == 0:
            db.execute("INSERT INTO funnelgate_schema (version) VALUES (?)", (VERSION,))
        elif before < VERSION:
            db.execute("UPDATE funnelgate_schema SET version = ?", (VERSION,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction and not db.broken:
            db.execute("ROLLBACK")
        raise
    return before, VERSION
