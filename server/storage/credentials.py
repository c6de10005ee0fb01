"""Per-user Meta access tokens, keyed by project and user (the JWT `sub`).

One SQLite file in WAL mode: the CLI writes while the server reads. Lookups are a primary-key
read (microseconds), so the server calls them directly on the event loop.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    project_id   TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    access_token TEXT NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (project_id, user_id)
)
"""


@dataclass(frozen=True)
class CredentialInfo:
    """What `list` shows: never the token itself."""

    project_id: str
    user_id: str
    updated_at: int


class CredentialStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)
        path.chmod(0o600)  # the file holds access tokens

    def close(self) -> None:
        self._db.close()

    def get(self, project_id: str, user_id: str) -> str | None:
        row = self._db.execute(
            "SELECT access_token FROM credentials WHERE project_id = ? AND user_id = ?",
            (project_id, user_id),
        ).fetchone()
        return None if row is None else str(row[0])

    def set(self, project_id: str, user_id: str, access_token: str) -> None:
        self._db.execute(
            "INSERT INTO credentials VALUES (?, ?, ?, ?) ON CONFLICT (project_id, user_id) "
            "DO UPDATE SET access_token = excluded.access_token, updated_at = excluded.updated_at",
            (project_id, user_id, access_token, int(time.time())),
        )

    def remove(self, project_id: str, user_id: str) -> bool:
        cursor = self._db.execute(
            "DELETE FROM credentials WHERE project_id = ? AND user_id = ?", (project_id, user_id)
        )
        return cursor.rowcount > 0

    def list(self, project_id: str | None = None) -> list[CredentialInfo]:
        rows = self._db.execute(
            "SELECT project_id, user_id, updated_at FROM credentials "
            "WHERE ?1 IS NULL OR project_id = ?1 ORDER BY project_id, user_id",
            (project_id,),
        ).fetchall()
        return [CredentialInfo(*row) for row in rows]
