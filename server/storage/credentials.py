"""Credentials: the Meta access tokens of connected users (the JWT `sub`), sealed at rest.

A user may have several (ActionKit's Multi Account Authorization,
https://docs.useparagon.com/apis/api-reference/multi-account-authorization): each has an id
(a UUID), an optional external id (`ext:<id>`) and label, one is the user's default, and its
status turns `invalid` when Meta refuses its token.

The CLI writes (`CredentialStore`, a connection of its own) while servers read (`Credentials`,
through the server's database: on SQLite an index read on the loop, on PostgreSQL a pooled
read off it), every call: a credential set on any host is used by every instance's next call.
On PostgreSQL the store's write transactions take turns under an advisory lock, as BEGIN
IMMEDIATE makes them on SQLite.

Every file of a SQLite database (main, `-wal`, `-shm`) is 0600 from creation: the main file is made
0600 before SQLite opens it, and SQLite gives its `-wal` and `-shm` the main file's mode
(https://www.sqlite.org/tempfiles.html names the files; os_unix.c's findCreateFileMode copies
the mode). Tokens are sealed with the newest configured key (`crypto.py`); `secure_delete`
zeroes what an update or a delete leaves behind (https://www.sqlite.org/pragma.html#pragma_secure_delete).

Databases written by funnelgate 0.1 hold tokens in plain text (schema version 0): opening one
with a secret key configured seals every token, rebuilds the file and empties the WAL, so no
plain-text copy survives; without a key it is refused with a message that says what to do.
Version 1 held one sealed token per user; each becomes its user's default credential.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from server.config import Project, StorageSettings
from server.errors import ConfigError
from server.permissions import canonical_id
from server.storage import postgres, schema_pg
from server.storage.crypto import NO_KEY_HINT, Keyring
from server.storage.database import (
    ERRORS,
    Connection,
    Database,
    conditions,
    first_line,
    is_postgres,
    read_for_caller,
)
from server.storage.outbox import tie_to_credentials
from server.storage.writer import BUSY_TIMEOUT_MS, into_wal

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    project_id    TEXT NOT NULL,
    credential_id TEXT NOT NULL,     -- a UUID: what X-Paragon-Credential names
    user_id       TEXT NOT NULL,
    external_id   TEXT,              -- the caller's own id for it: `ext:<id>`
    label         TEXT,
    is_default    INTEGER NOT NULL,  -- TRUE (1) for the credential a call without the header uses
    status        TEXT NOT NULL,     -- valid | invalid (Meta refused the token)
    status_error  BLOB,              -- JSON: Meta's refusal (code, subcode, message, fbtrace_id)
    key_id        TEXT NOT NULL,     -- the secret key that sealed the token
    sealed_token  BLOB NOT NULL,     -- nonce || AES-256-GCM(token), bound to project and user
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    last_used_at  INTEGER,
    PRIMARY KEY (project_id, credential_id)
);
CREATE INDEX IF NOT EXISTS credentials_by_key ON credentials (key_id);
CREATE INDEX IF NOT EXISTS credentials_by_user ON credentials (project_id, user_id);
CREATE UNIQUE INDEX IF NOT EXISTS credentials_default ON credentials (project_id, user_id)
    WHERE is_default;
CREATE UNIQUE INDEX IF NOT EXISTS credentials_external ON credentials
    (project_id, user_id, external_id) WHERE external_id IS NOT NULL;
"""
_SUFFIXES = ("", "-wal", "-shm", "-journal")
ROTATE_BATCH = 500  # rows per write transaction: the CLI never holds the write lock for long
MAX_SELECTOR = 200  # characters of a credential id or `ext:<id>`
EXTERNAL = "ext:"  # addresses a credential by its external id, as Paragon does
WRITE_LOCK_ID = schema_pg.LOCK_ID + 1  # PostgreSQL: the store's writers take turns (_transaction)
_FIELDS = (
    "project_id, credential_id, user_id, external_id, label, is_default, status, status_error, "
    "key_id, sealed_token, created_at, updated_at, last_used_at"
)

_OF_USER = f"SELECT {_FIELDS} FROM credentials WHERE project_id = ? AND user_id = ? AND "  # noqa: S608
_BY_DEFAULT = _OF_USER + "is_default"
_BY_EXTERNAL = _OF_USER + "external_id = ?"
_BY_ID = _OF_USER + "credential_id = ?"


@dataclass(frozen=True, slots=True)
class Credential:
    """One connected Meta account of a user. The sealed token is here to be opened by the
    store; nothing prints it (and it is ciphertext)."""

    project_id: str
    id: str
    user_id: str
    external_id: str | None
    label: str | None
    default: bool
    status: str  # valid | invalid
    status_error: dict[str, Any] | None
    key_id: str
    sealed_token: bytes = field(repr=False)
    created_at: int = 0
    updated_at: int = 0
    last_used_at: int | None = None

    @classmethod
    def of_row(cls, row: Sequence[Any]) -> Credential:
        project_id, id_, user_id, external_id, label, default, status, error, *rest = row
        error = orjson.loads(error) if error else None
        return cls(project_id, id_, user_id, external_id, label, bool(default), status, error,
                   *rest)  # fmt: skip


CredentialList = list[Credential]  # aliases: the store's `list` and `set` shadow the builtins
Columns = set[str]
OlderRows = list[tuple[str, str, str, bytes, int]]
Uses = list[tuple[int, str, str]]  # (last used at, project, credential id)


def open_credentials(storage: StorageSettings, *, verify: bool = True) -> CredentialStore:
    """The store the config describes, its schema brought up to date; `verify` checks that
    the keys open every key id in use.

    Every failure (a missing or wrong key, an unreadable or foreign file, a database that
    cannot be reached) is a `ConfigError`.
    """
    try:
        if storage.url is not None:
            db: Connection = postgres.connect(storage.url)
            try:
                schema_pg.upgrade(db)
            except BaseException:
                db.close()
                raise
        else:
            db = _open_file(storage.database_path)
        store = CredentialStore(db, keyring_of(storage))
    except ERRORS as exc:
        raise ConfigError(f"storage {storage.where}: {first_line(exc)}") from None
    if verify:
        try:
            store.verify_keys()
        except BaseException:
            store.close()
            raise
    return store


def keyring_of(storage: StorageSettings) -> Keyring:
    return Keyring(
        storage.secret_keys, reload_from=storage.secret_key_file, origin=storage.secret_key_origin
    )


def _open_file(path: Path) -> sqlite3.Connection:
    _create_private(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        into_wal(db)
        db.execute("PRAGMA secure_delete=ON")
    except BaseException:
        db.close()
        raise
    return db


def find(db: Connection, project_id: str, user_id: str, selector: str | None) -> Credential | None:
    """The user's credential that `selector` names (its id, or `ext:` and its external id),
    or the user's default one when there is no selector; never another user's."""
    args: tuple[str, ...]
    if selector is None:
        statement, args = _BY_DEFAULT, (project_id, user_id)
    elif selector.startswith(EXTERNAL):
        statement, args = _BY_EXTERNAL, (project_id, user_id, selector[len(EXTERNAL) :])
    else:
        statement, args = _BY_ID, (project_id, user_id, canonical_id(selector))
    row = db.execute(statement, args).fetchone()
    return None if row is None else Credential.of_row(row)


def by_id(db: Connection, project_id: str, credential_id: str) -> Credential | None:
    row = db.execute(
        f"SELECT {_FIELDS} FROM credentials WHERE project_id = ? AND credential_id = ?",  # noqa: S608
        (project_id, credential_id),
    ).fetchone()
    return None if row is None else Credential.of_row(row)


class Credentials:
    """The server's view: lookups through the database's reads (on PostgreSQL off the loop),
    so a credential set from the CLI on any host is used by the next call of every instance."""

    def __init__(self, database: Database, keyring: Keyring) -> None:
        self._database = database
        self._keyring = keyring
        self._used: dict[tuple[str, str], int] = {}  # last uses not yet written

    async def find(
        self, project_id: str, user_id: str, selector: str | None = None
    ) -> Credential | None:
        job = partial(find, project_id=project_id, user_id=user_id, selector=selector)
        return await read_for_caller(self._database, job)

    async def by_id(self, project_id: str, credential_id: str) -> Credential | None:
        job = partial(by_id, project_id=project_id, credential_id=credential_id)
        return await read_for_caller(self._database, job)

    def open(self, project_id: str, credential: Credential) -> str:
        """The credential's access token, and a use of it (written by `write_uses`)."""
        self._used[(project_id, credential.id)] = int(time.time())
        return _opened(self._keyring, project_id, credential)

    async def token_of(self, project: Project, credential_id: str | None) -> str | None:
        """The token events accepted for `credential_id` go with now (None: the project's);
        None when that credential is gone."""
        if credential_id is None:
            return project.facebook_access_token
        found = await self.by_id(project.id, credential_id)
        return None if found is None else self.open(project.id, found)

    def taken_uses(self) -> Uses:
        """The last uses recorded since the previous call, as `write_uses` rows."""
        used, self._used = self._used, {}
        return [(at, project_id, credential_id) for (project_id, credential_id), at in used.items()]


class CredentialStore:
    """The CLI's store, and start-up's (migration, key checks): a connection of its own."""

    def __init__(self, db: Connection, keyring: Keyring) -> None:
        self._keyring = keyring
        self._db = db
        try:
            if not is_postgres(db):
                self._migrate()
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def find(self, project_id: str, user_id: str, selector: str | None = None) -> Credential | None:
        return find(self._db, project_id, user_id, selector)

    def by_id(self, project_id: str, credential_id: str) -> Credential | None:
        return by_id(self._db, project_id, credential_id)

    def open(self, project_id: str, credential: Credential) -> str:
        """The credential's access token (reading it here is not a use)."""
        return _opened(self._keyring, project_id, credential)

    def get(self, project_id: str, user_id: str) -> str | None:
        """The token of the user's default credential."""
        found = self.find(project_id, user_id)
        return None if found is None else self.open(project_id, found)

    def token_of(self, project: Project, credential_id: str | None) -> str | None:
        """The token events accepted for `credential_id` go with now (None: the project's);
        None when that credential is gone."""
        if credential_id is None:
            return project.facebook_access_token
        found = self.by_id(project.id, credential_id)
        return None if found is None else self.open(project.id, found)

    def set(
        self,
        project_id: str,
        user_id: str,
        access_token: str,
        *,
        credential_id: str | None = None,
        external_id: str | None = None,
        label: str | None = None,
        make_default: bool = False,
    ) -> tuple[Credential, bool]:
        """Stores a token under the credential `credential_id` or `external_id` names (a new
        one when neither names one of the user's); a replaced token is `valid` again. The
        user's first credential is its default. Returns the credential and whether it is new."""
        key, sealed = self._keyring.seal(access_token.encode(), _context(project_id, user_id))
        now = int(time.time())
        with self._transaction():
            existing = None
            if credential_id is not None:
                existing = self.by_id(project_id, credential_id)
                if existing is not None and existing.user_id != user_id:
                    raise ConfigError(f"credential {credential_id} belongs to another user")
            elif external_id is not None:
                existing = self.find(project_id, user_id, EXTERNAL + external_id)
            if existing is None:
                credential_id = credential_id or str(uuid.uuid4())
                first = self.find(project_id, user_id) is None
                self._db.execute(
                    f"INSERT INTO credentials ({_FIELDS}) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, FALSE, 'valid', NULL, ?, ?, ?, ?, NULL)",
                    (project_id, credential_id, user_id, external_id, label, key, sealed, now, now),
                )
                make_default = make_default or first
            else:
                credential_id = existing.id
                self._db.execute(
                    "UPDATE credentials SET key_id = ?, sealed_token = ?, updated_at = ?, "
                    "status = 'valid', status_error = NULL, "
                    "external_id = coalesce(?, external_id), label = coalesce(?, label) "
                    "WHERE project_id = ? AND credential_id = ?",
                    (key, sealed, now, external_id, label, project_id, credential_id),
                )
            if make_default:
                self._make_default(project_id, user_id, credential_id)
            stored = self.by_id(project_id, credential_id)
        assert stored is not None
        return stored, existing is None

    def remove(self, project_id: str, credential_id: str) -> Credential | None:
        """Deletes one credential; when it was its user's default, the user's most recently
        updated other credential becomes the default."""
        with self._transaction():
            found = self.by_id(project_id, credential_id)
            if found is None:
                return None
            self._db.execute(
                "DELETE FROM credentials WHERE project_id = ? AND credential_id = ?",
                (project_id, credential_id),
            )
            if found.default:
                heir = self._db.execute(
                    "SELECT credential_id FROM credentials WHERE project_id = ? AND user_id = ? "
                    "ORDER BY updated_at DESC, credential_id LIMIT 1",
                    (project_id, found.user_id),
                ).fetchone()
                if heir is not None:
                    self._make_default(project_id, found.user_id, heir[0])
        return found

    def list(self, project_id: str | None = None, user_id: str | None = None) -> CredentialList:
        where, args = conditions(("project_id = ?", project_id), ("user_id = ?", user_id))
        rows = self._db.execute(
            f"SELECT {_FIELDS} FROM credentials WHERE {where} "  # noqa: S608
            "ORDER BY project_id, user_id, created_at, credential_id",
            args,
        ).fetchall()
        return [Credential.of_row(row) for row in rows]

    def _make_default(self, project_id: str, user_id: str, credential_id: str) -> None:
        self._db.execute(
            "UPDATE credentials SET is_default = FALSE WHERE project_id = ? AND user_id = ? "
            "AND is_default",
            (project_id, user_id),
        )
        self._db.execute(
            "UPDATE credentials SET is_default = TRUE WHERE project_id = ? AND credential_id = ?",
            (project_id, credential_id),
        )

    def key_ids(self) -> dict[str, int]:
        """How many stored tokens each key sealed."""
        rows = self._db.execute("SELECT key_id, count(*) FROM credentials GROUP BY key_id")
        return dict(rows.fetchall())

    def verify_keys(self) -> None:
        """Open one token per key id in use: a missing or wrong key fails here, at start-up."""
        rows = [
            self._db.execute(
                "SELECT key_id, project_id, user_id, sealed_token FROM credentials "
                "WHERE key_id = ? LIMIT 1",
                (key,),
            ).fetchone()
            for (key,) in self._db.execute("SELECT DISTINCT key_id FROM credentials").fetchall()
        ]
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
                    "SELECT project_id, credential_id, user_id, key_id, sealed_token "
                    "FROM credentials WHERE key_id != ? LIMIT ?",
                    (current, ROTATE_BATCH),
                ).fetchall()
                for project_id, credential_id, user_id, key, sealed in rows:
                    context = _context(project_id, user_id)
                    new_key, resealed = self._keyring.seal(
                        self._keyring.open(key, sealed, context), context
                    )
                    self._db.execute(
                        "UPDATE credentials SET key_id = ?, sealed_token = ? "
                        "WHERE project_id = ? AND credential_id = ?",
                        (new_key, resealed, project_id, credential_id),
                    )
            done += len(rows)
            if len(rows) < ROTATE_BATCH:
                return done

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if is_postgres(self._db):
                # SQLite's BEGIN IMMEDIATE makes the store's writers take turns, and `set`
                # needs that (what it reads decides what it writes: the user's first credential
                # is the default, an external id names one credential); PostgreSQL's BEGIN
                # does not, so two CLIs take this lock instead, held until COMMIT.
                self._db.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_ID,))
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        """Brings the file to SCHEMA_VERSION. Version 0 is funnelgate 0.1's plain-text tokens
        (sealed here), version 1 one sealed token per user (each becomes the user's default
        credential, under a new id, and the user's queued events are tied to it)."""
        if self._schema_version() == SCHEMA_VERSION:
            return
        with self._transaction():  # another process may be migrating too: look again, locked
            if self._schema_version() == SCHEMA_VERSION:
                return
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(credentials)")}
            plaintext = "access_token" in columns
            rows = self._older_rows(columns)
            if columns:
                self._db.execute("DROP TABLE credentials")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.executemany(
                f"INSERT INTO credentials ({_FIELDS}) "  # noqa: S608
                "VALUES (?, ?, ?, NULL, NULL, TRUE, 'valid', NULL, ?, ?, ?, ?, NULL)",
                [
                    (project_id, str(uuid.uuid4()), user_id, key, sealed, updated, updated)
                    for project_id, user_id, key, sealed, updated in rows
                ],
            )
            tie_to_credentials(self._db)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if plaintext and rows:
            # Rebuild the file and empty the WAL: no page keeps a plain-text token.
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _older_rows(self, columns: Columns) -> OlderRows:
        """The rows of a version 0 or 1 table as (project, user, key id, sealed, updated)."""
        if "sealed_token" in columns:
            return list(
                self._db.execute(
                    "SELECT project_id, user_id, key_id, sealed_token, updated_at FROM credentials"
                ).fetchall()
            )
        if "access_token" not in columns:
            return []
        plaintext = self._db.execute(
            "SELECT project_id, user_id, access_token, updated_at FROM credentials"
        ).fetchall()
        if plaintext and self._keyring.current_id is None:
            raise ConfigError(
                f"the database holds {len(plaintext)} access token(s) in plain text, "
                f"written by funnelgate 0.1: {NO_KEY_HINT}, then start again to encrypt them"
            )
        sealed = []
        for project_id, user_id, token, updated_at in plaintext:
            key, box = self._keyring.seal(token.encode(), _context(project_id, user_id))
            sealed.append((project_id, user_id, key, box, updated_at))
        return sealed

    def _schema_version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"the credentials database has schema version {version}, made by a newer "
                "funnelgate: upgrade funnelgate"
            )
        return version


def mark_invalid(
    db: Connection,
    project_id: str,
    credential_id: str,
    error: dict[str, Any],
    *,
    refused: bytes | None = None,
) -> None:
    """Meta refused the credential's token; `set` on it makes it valid again. With `refused`
    (the sealed token Meta refused), a token replaced meanwhile is left valid."""
    where, args = conditions(("sealed_token = ?", refused))
    db.execute(
        "UPDATE credentials SET status = 'invalid', status_error = ? "  # noqa: S608
        f"WHERE project_id = ? AND credential_id = ? AND {where}",
        (orjson.dumps(error), project_id, credential_id, *args),
    )


def write_uses(db: Connection, uses: Uses) -> None:
    """`last_used_at` of the credentials `Credentials.taken_uses` names. In key order:
    instances writing theirs at once lock the rows in one order, so they never deadlock on
    PostgreSQL (storage/minutes.py's `add` says more)."""
    db.executemany(
        "UPDATE credentials SET last_used_at = ? WHERE project_id = ? AND credential_id = ? "
        "AND (last_used_at IS NULL OR last_used_at < ?)",
        [
            (at, project_id, credential_id, at)
            for at, project_id, credential_id in sorted(uses, key=lambda use: use[1:])
        ],
    )


def _opened(keyring: Keyring, project_id: str, credential: Credential) -> str:
    """The access token `credential` seals."""
    context = _context(project_id, credential.user_id)
    return keyring.open(credential.key_id, credential.sealed_token, context).decode()


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
