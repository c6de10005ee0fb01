"""PostgreSQL connections: ones the server ended while idle (a restart, an admin's
pg_terminate_backend) are replaced, not answered with a 503; the URL's own options are kept;
a role without CREATE rights serves a current database."""

from __future__ import annotations

import asyncio

import orjson
import psycopg

from server.storage.database import PostgresDatabase
from server.storage.outbox import NewEvent, Outbox, event_status
from server.storage.postgres import connect
from server.storage.schema_pg import VERSION, upgrade


def _terminate_funnelgate_connections(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'funnelgate' AND pid <> pg_backend_pid() "
            "AND datname = current_database()"
        ).fetchall()
    return len(rows)


def test_the_writer_and_readers_replace_connections_the_server_ended(postgres_url: str):
    db = connect(postgres_url)
    upgrade(db)
    db.close()
    event = {"event_id": "e-1", "event_name": "Lead", "event_time": 1_795_000_000}

    def new(event_id: str) -> NewEvent:
        body = {**event, "event_id": event_id}
        return NewEvent("p", "u", None, "1", None, body, orjson.dumps(body))

    async def scenario() -> None:
        queue = Outbox(PostgresDatabase(postgres_url), clock=lambda: 1_795_000_000.0)
        try:
            await queue.enqueue([new("before")])  # the writer's connection is open
            await queue.read(lambda db: event_status(db, "p", "u", "before"))
            assert _terminate_funnelgate_connections(postgres_url) >= 2
            assert await queue.enqueue([new("after")])  # no StorageUnavailable
            found = await queue.read(lambda db: event_status(db, "p", "u", "after"))
            assert found is not None and found.status == "queued"
            assert not queue.database.failing
        finally:
            queue.close()

    asyncio.run(scenario())


def test_the_urls_own_options_and_name_are_kept(postgres_url: str):
    """A deployment keeping funnelgate in a schema of its own says so in the URL's `options`:
    funnelgate adds its statement timeout to them rather than replacing them."""
    url = postgres_url + "&options=-csearch_path%3Dfunnelgate_app&application_name=fg-eu"
    db = connect(url)
    try:
        shown = [
            db.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("search_path", "statement_timeout", "application_name")
        ]
    finally:
        db.close()
    assert shown == ["funnelgate_app", "30s", "fg-eu"]


def test_a_role_without_create_rights_serves_a_current_database(postgres_url: str):
    """Production roles often may only read and write rows: once the schema is current (an
    admin ran `funnelgate db upgrade`), starting needs no DDL."""
    owner = connect(postgres_url)
    upgrade(owner)
    owner.execute("DROP ROLE IF EXISTS fg_app")
    owner.execute("CREATE ROLE fg_app LOGIN")
    owner.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    owner.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO fg_app")
    owner.close()
    app = connect(postgres_url.replace("user=postgres", "user=fg_app"))
    try:
        assert app.execute("SELECT current_user").fetchone() == ("fg_app",)
        assert upgrade(app) == (VERSION, VERSION)
    finally:
        app.close()
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("DROP OWNED BY fg_app")
            admin.execute("DROP ROLE fg_app")
