"""Per-user Meta access tokens, keyed by project and user (the JWT `sub`), sealed at rest.

One SQLite file in WAL mode: the CLI writes while the server reads. Lookups are a primary-key
read and one AES-GCM open (microseconds), so the server calls them directly on the event loop.

Every file of the database (main, `-wal`, `-shm`) is 0600 from creation: the main file is made
0600 before SQLite opens it, and SQLite gives its `-wal` and `-shm` the main file's mode
(https://www.sqlite.org/tempfiles.html names the files; os_unix.c's findCreateFileMode copies
the mode). Tokens are sealed with the newest configured key (`crypto.py`); `secure_delete`
zeroes what an update or a delete leaves behind (https://www.sqlite.org/pragma.html#pragma_secure_delete).

Databases written by funnelgate 0.1 hold tokens in plain text (schema version 0): opening one
with a secret key configured seals every token, rebuilds the file and empties the WAL, so no
plain-text copy survives; without a key it is refused with a message that says what to do.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson

from server.config import Project, StorageSettings
from server.errors import ConfigError
from server.storage.crypto import NO_KEY_HINT, Keyring

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    project_id   TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    key_id       TEXT NOT NULL,     -- the secret key that sealed the token
    sealed_token BLOB NOT NULL,     -- nonce || AES-256-GCM(token), bound to the row's ids
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX IF NOT EXISTS credentials_by_key ON credentials (key_id);
"""
_SUFFIXES = ("", "-wal", "-shm", "-journal")
ROTATE_BATCH = 500  # rows per write transaction: the CLI never holds the write lock for long


@dataclass(frozen=True)
class CredentialInfo:
    """What `list` shows: never the token itself."""

    project_id: str
    user_id: str
    updated_at: int
    key_id: str


def open_credentials(storage: StorageSettings, *, verify: bool = True) -> CredentialStore:
    """The store the config describes; `verify` checks that the keys open every key id in use.

    Every failure (a missing or wrong key, an unreadable or foreign file) is a `ConfigError`.
    """
    keyring = Keyring(
        storage.secret_keys, reload_from=storage.secret_key_file, origin=storage.secret_key_origin
    )
    try:
        store = CredentialStore(storage.database_path, keyring)
    except sqlite3.Error as exc:
        raise ConfigError(f"storage {storage.database_path}: {exc}") from None
    if verify:
        try:
            store.verify_keys()
        except BaseException:
            store.close()
            raise
    return store


class CredentialStore:
    def __init__(self, path: Path, keyring: Keyring) -> None:
        self._keyring = keyring
        _create_private(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def get(self, project_id: str, user_id: str) -> str | None:
        row = self._db.execute(
            "SELECT key_id, sealed_token FROM credentials WHERE project_id = ? AND user_id = ?",
            (project_id, user_id),
        ).fetchone()
        if row is None:
            return None
        return self._keyring.open(row[0], row[1], _context(project_id, user_id)).decode()

    def token_for(self, project: Project, user_id: str) -> str | None:
        """The token the user's events go with: its own credential wins over the project's."""
        return self.get(project.id, user_id) or project.facebook_access_token

    def has(self, project_id: str, user_id: str) -> bool:
        """Whether the user has a credential; opens nothing."""
        row = self._db.execute(
            "SELECT 1 FROM credentials WHERE project_id = ? AND user_id = ?", (project_id, user_id)
        ).fetchone()
        return row is not None

    def set(self, project_id: str, user_id: str, access_token: str) -> None:
        key, sealed = self._keyring.seal(access_token.encode(), _context(project_id, user_id))
        self._db.execute(
            "INSERT INTO credentials VALUES (?, ?, ?, ?, ?) ON CONFLICT (project_id, user_id) "
            "DO UPDATE SET key_id = excluded.key_id, sealed_token = excluded.sealed_token, "
            "updated_at = excluded.updated_at",
            (project_id, user_id, key, sealed, int(time.time())),
        )

    def remove(self, project_id: str, user_id: str) -> bool:
        cursor = self._db.execute(
            "DELETE FROM credentials WHERE project_id = ? AND user_id = ?", (project_id, user_id)
        )
        return cursor.rowcount > 0

    def list(self, project_id: str | None = None) -> list[CredentialInfo]:
        rows = self._db.execute(
            "SELECT project_id, user_id, updated_at, key_id FROM credentials "
            "WHERE ?1 IS NULL OR project_id = ?1 ORDER BY project_id, user_id",
            (project_id,),
        ).fetchall()
        return [CredentialInfo(*row) for row in rows]

    def key_ids(self) -> dict[str, int]:
        """How many stored tokens each key sealed."""
        rows = self._db.execute("SELECT key_id, count(*) FROM credentials GROUP BY key_id")
        return dict(rows.fetchall())

    def verify_keys(self) -> None:
        """Open one token per key id in use: a missing or wrong key fails here, at start-up."""
        rows = self._db.execute(
            "SELECT key_id, project_id, user_id, sealed_token FROM credentials WHERE rowid IN "
            "(SELECT min(rowid) FROM credentials GROUP BY key_id)"
        ).fetchall()
        if rows and self._keyring.current_id is None:
            raise ConfigError(
                f"the database holds encrypted access tokens but no secret key is configured: "
                f"{NO_KEY_HINT}"
            )
        for key, project_id, user_id, sealed in rows:
            self._keyring.open(key, sealed, _context(project_id, user_id))

    def rotate(self) -> int:
        """Re-seal every token that another key sealed with the newest key; how many."""
        current = self._keyring.current_id
        if current is None:
            raise ConfigError(f"no secret key is configured: {NO_KEY_HINT}")
        done = 0
        while True:
            with self._transaction():
                rows = self._db.execute(
                    "SELECT project_id, user_id, key_id, sealed_token FROM credentials "
                    "WHERE key_id != ? LIMIT ?",
                    (current, ROTATE_BATCH),
                ).fetchall()
                for project_id, user_id, key, sealed in rows:
                    context = _context(project_id, user_id)
                    new_key, resealed = self._keyring.seal(
                        self._keyring.open(key, sealed, context), context
                    )
                    self._db.execute(
                        "UPDATE credentials SET key_id = ?, sealed_token = ? "
                        "WHERE project_id = ? AND user_id = ?",
                        (new_key, resealed, project_id, user_id),
                    )
            done += len(rows)
            if len(rows) < ROTATE_BATCH:
                return done

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        if self._schema_version() == SCHEMA_VERSION:
            return
        with self._transaction():  # another process may be migrating too: look again, locked
            if self._schema_version() == SCHEMA_VERSION:
                return
            plaintext = self._plaintext_rows()
            if plaintext and self._keyring.current_id is None:
                raise ConfigError(
                    f"the database holds {len(plaintext)} access token(s) in plain text, "
                    f"written by funnelgate 0.1: {NO_KEY_HINT}, then start again to encrypt them"
                )
            if plaintext is not None:
                self._db.execute("DROP TABLE credentials")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            for project_id, user_id, token, updated_at in plaintext or []:
                key, sealed = self._keyring.seal(token.encode(), _context(project_id, user_id))
                self._db.execute(
                    "INSERT INTO credentials VALUES (?, ?, ?, ?, ?)",
                    (project_id, user_id, key, sealed, updated_at),
                )
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if plaintext:
            # Rebuild the file and empty the WAL: no page keeps a plain-text token.
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _schema_version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"the credentials database has schema version {version}, made by a newer "
                "funnelgate: upgrade funnelgate"
            )
        return version

    def _plaintext_rows(self) -> Sequence[tuple[str, str, str, int]] | None:
        """funnelgate 0.1's rows, or None when there is no 0.1 table."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(credentials)")}
        if "access_token" not in columns:
            return None
        return self._db.execute(
            "SELECT project_id, user_id, access_token, updated_at FROM credentials"
        ).fetchall()


def _context(project_id: str, user_id: str) -> bytes:
    """The associated data that binds a sealed token to its row."""
    return orjson.dumps(["funnelgate credential v1", project_id, user_id])


def _create_private(path: Path) -> None:
    """The database file exists with mode 0600 before SQLite opens it; leftovers made wider
    (by funnelgate 0.1, or a copy) are narrowed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for suffix in _SUFFIXES:
            sibling = path.with_name(path.name + suffix)
            if sibling.exists() and sibling.stat().st_mode & 0o077:
                sibling.chmod(0o600)
    except OSError as exc:
        raise ConfigError(f"storage {path}: {exc.strerror}") from None
