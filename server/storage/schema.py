"""Bringing a database to this version's schema, on either backend (`funnelgate db upgrade`;
`serve` does the same at start).

SQLite's version is the file's `user_version` (credentials.py migrates it, in one locked
transaction), and the other tables are created where missing; PostgreSQL's is
`funnelgate_schema` (schema_pg.py). Both are safe when several processes upgrade at once.
"""

from __future__ import annotations

import contextlib

from server.config import StorageSettings
from server.errors import ConfigError
from server.storage import (
    breakers,
    credentials,
    idempotency,
    minutes,
    outbox,
    postgres,
    schema_pg,
)
from server.storage.database import ERRORS, first_line
from server.storage.writer import connect


def upgrade_schema(storage: StorageSettings) -> tuple[int, int]:
    """(version before, version after); a ConfigError when the database cannot be reached
    or is newer than this funnelgate."""
    try:
        if storage.url is not None:
            with contextlib.closing(postgres.connect(storage.url)) as pg:
                return schema_pg.upgrade(pg)
        path = storage.database_path
        before = 0
        if path.exists():
            with contextlib.closing(connect(path)) as db:
                before = int(db.execute("PRAGMA user_version").fetchone()[0])
        credentials.open_credentials(storage, verify=False).close()  # its own migration
        with contextlib.closing(connect(path)) as db:
            outbox.create_schema(db)
            idempotency.create_schema(db)
            minutes.create_schema(db)
            breakers.create_schema(db)
        return before, credentials.SCHEMA_VERSION
    except ERRORS as exc:
        raise ConfigError(f"storage {storage.where}: {first_line(exc)}") from None
