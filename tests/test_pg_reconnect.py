"""PostgreSQL connections the server ended while idle (a restart, an admin's
pg_terminate_backend): the next write and read go through on new connections, not a 503."""

from __future__ import annotations

import asyncio

import orjson
import psycopg

from server.storage.database import PostgresDatabase
from server.storage.outbox import NewEvent, Outbox, event_status
from server.storage.postgres import connect
from server.storage.schema_pg import upgrade


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
