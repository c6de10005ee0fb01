"""The credential store on real SQLite files: modes from creation, tokens sealed at rest and
bound to their row, key checks at start-up, rotation, and funnelgate 0.1's plain-text rows."""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from server.config import StorageSettings
from server.errors import ConfigError, StorageUnavailable
from server.storage import credentials as credentials_module
from server.storage.credentials import SCHEMA_VERSION, open_credentials
from server.storage.crypto import (
    Keyring,
    SecretKeyError,
    add_secret_key,
    key_id,
    new_secret_key,
    parse_secret_keys,
    read_secret_key_file,
)
from server.storage.outbox import NewEvent, Outbox

TOKEN = "EAAB-storage-secret-token-4f1c"
OTHER = "EAAB-another-users-token-9a2e"
KEY_A = new_secret_key()
KEY_B = new_secret_key()


def settings(db: Path, *key_texts: str) -> StorageSettings:
    """Keys newest first, as FUNNELGATE_SECRET_KEY gives them."""
    secret = parse_secret_keys(",".join(key_texts), "test keys") if key_texts else ()
    return StorageSettings(db, secret, None, "test keys")


def from_file(db: Path, key_file: Path) -> StorageSettings:
    return StorageSettings(db, read_secret_key_file(key_file), key_file, f"file {key_file}")


def id_of(key_text: str) -> str:
    return parse_secret_keys(key_text, "test")[0].id


def database_files(db: Path) -> list[Path]:
    return [db.with_name(db.name + suffix) for suffix in ("", "-wal", "-shm")]


@contextmanager
def raw(db: Path) -> Iterator[sqlite3.Connection]:
    """A plain SQLite connection, as anyone with access to the file has."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "funnelgate.db"


@pytest.fixture
def wide_umask() -> Iterator[None]:
    """The usual 022: a file SQLite creates would be world-readable unless made otherwise."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_every_database_file_is_0600_from_creation(tmp_path: Path, wide_umask):
    db = tmp_path / "data" / "funnelgate.db"
    store = open_credentials(settings(db, KEY_A))
    try:
        store.set("p1", "u1", TOKEN)  # the -wal and -shm exist while a connection is open
        for path in database_files(db):
            assert path.exists(), path
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    finally:
        store.close()


def test_files_an_older_version_left_readable_are_narrowed(db: Path):
    for path in database_files(db):
        path.write_bytes(b"")
        path.chmod(0o644)
    store = open_credentials(settings(db))
    try:
        assert [stat.S_IMODE(p.stat().st_mode) for p in database_files(db)] == [0o600] * 3
    finally:
        store.close()


def test_tokens_are_sealed_at_rest_in_every_file_and_read_back(db: Path):
    writer = open_credentials(settings(db, KEY_A))
    reader = open_credentials(settings(db, KEY_A))  # another connection, as the server reads
    try:
        writer.set("p1", "u1", TOKEN)
        writer.set("p1", "u2", OTHER)
        assert (reader.get("p1", "u1"), reader.get("p1", "u2")) == (TOKEN, OTHER)
        assert reader.get("p1", "nobody") is None
        assert db.with_name(db.name + "-wal").stat().st_size > 0  # the rows are in the WAL
        for path in database_files(db):
            data = path.read_bytes()
            assert TOKEN.encode() not in data and OTHER.encode() not in data, path
        assert [(i.user_id, i.key_id) for i in reader.list()] == [
            ("u1", id_of(KEY_A)),
            ("u2", id_of(KEY_A)),
        ]
    finally:
        writer.close()
        reader.close()


def test_a_sealed_token_opens_only_in_its_own_row(db: Path):
    store = open_credentials(settings(db, KEY_A))
    store.set("p1", "u1", TOKEN)
    store.set("p1", "u2", OTHER)
    with raw(db) as conn:  # someone with write access swaps the two users' tokens
        one, two = (
            r[0] for r in conn.execute("SELECT sealed_token FROM credentials ORDER BY user_id")
        )
        conn.execute("UPDATE credentials SET sealed_token = ? WHERE user_id = 'u1'", (two,))
        conn.execute("UPDATE credentials SET sealed_token = ? WHERE user_id = 'u2'", (one,))
    with pytest.raises(SecretKeyError, match="fails authentication"):
        store.get("p1", "u1")
    store.close()
    with pytest.raises(ConfigError, match="fails authentication"):
        open_credentials(settings(db, KEY_A))  # and start-up says so


def test_start_up_refuses_a_missing_or_wrong_key_naming_the_key_id(db: Path):
    store = open_credentials(settings(db, KEY_A))
    store.set("p1", "u1", TOKEN)
    store.close()

    with pytest.raises(ConfigError, match="no secret key is configured") as missing:
        open_credentials(settings(db))
    with pytest.raises(
        ConfigError, match=f"secret key {id_of(KEY_A)}, which is not configured"
    ) as wrong:
        open_credentials(settings(db, KEY_B))
    for error in (missing, wrong):
        text = str(error.value)
        assert "\n" not in text and KEY_A not in text and KEY_B not in text and TOKEN not in text

    # list and remove need no key, so a lost key can still be cleaned up
    store = open_credentials(settings(db), verify=False)
    assert [i.user_id for i in store.list()] == ["u1"]
    assert store.remove("p1", store.list()[0].id)
    store.close()
    open_credentials(settings(db, KEY_B)).close()  # nothing sealed remains: any key will do


def test_storing_a_token_without_a_key_is_refused(db: Path):
    store = open_credentials(settings(db))
    with pytest.raises(ConfigError, match="no secret key is configured"):
        store.set("p1", "u1", TOKEN)
    assert store.list() == []
    store.close()


def test_rotation_reseals_every_token_with_the_newest_key(db: Path, monkeypatch):
    monkeypatch.setattr(credentials_module, "ROTATE_BATCH", 2)  # several batches
    store = open_credentials(settings(db, KEY_A))
    tokens = {f"u{n}": f"EAAB-rotating-{n}" for n in range(5)}
    for user, token in tokens.items():
        store.set("p1", user, token)
    store.close()

    store = open_credentials(settings(db, KEY_B, KEY_A))  # new key first, old still there
    assert store.get("p1", "u3") == tokens["u3"]  # both keys open during the rotation
    assert store.rotate() == 5
    assert store.key_ids() == {id_of(KEY_B): 5}
    assert store.rotate() == 0
    store.close()

    store = open_credentials(settings(db, KEY_B))  # the old key can go
    assert {user: store.get("p1", user) for user in tokens} == tokens
    store.close()
    with pytest.raises(ConfigError, match=id_of(KEY_B)):
        open_credentials(settings(db, KEY_A))


def test_a_running_reader_follows_a_key_added_to_its_file(tmp_path: Path, db: Path):
    key_file = tmp_path / "secret.key"
    old_key = add_secret_key(key_file)
    reader = open_credentials(from_file(db, key_file))  # the server, started before the rotation
    reader_writes = open_credentials(from_file(db, key_file))
    reader_writes.set("p1", "u0", OTHER)
    reader_writes.close()
    key_file.unlink()  # the old key leaves the file too early: the running reader keeps it
    new_key = add_secret_key(key_file)
    writer = open_credentials(from_file(db, key_file), verify=False)
    writer.set("p1", "u1", TOKEN)
    writer.close()
    assert writer_key(db, "u1") == new_key.id != old_key.id
    assert reader.get("p1", "u1") == TOKEN  # read the file again on meeting the new key id
    assert reader.get("p1", "u0") == OTHER

    with raw(db) as conn:
        conn.execute("UPDATE credentials SET key_id = 'feedfacefeedface' WHERE user_id = 'u1'")
    with pytest.raises(SecretKeyError, match="feedfacefeedface, which is not configured"):
        reader.get("p1", "u1")
    reader.close()


def writer_key(db: Path, user: str) -> str:
    with raw(db) as conn:
        return str(
            conn.execute("SELECT key_id FROM credentials WHERE user_id = ?", (user,)).fetchone()[0]
        )


def make_0_1_database(db: Path, rows: list[tuple[str, str, str, int]]) -> None:
    """A database exactly as funnelgate 0.1 wrote it: tokens in plain text."""
    with raw(db) as conn:
        make_0_1_tables(conn, rows)


def make_0_1_tables(conn: sqlite3.Connection, rows: list[tuple[str, str, str, int]]) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS credentials (project_id TEXT NOT NULL, user_id TEXT NOT NULL, "
        "access_token TEXT NOT NULL, updated_at INTEGER NOT NULL, PRIMARY KEY (project_id, user_id))"
    )
    conn.executemany("INSERT INTO credentials VALUES (?, ?, ?, ?)", rows)


def test_plaintext_rows_of_0_1_are_refused_without_a_key(db: Path):
    make_0_1_database(db, [("p1", "u1", TOKEN, 1_700_000_000)])
    with pytest.raises(ConfigError, match=r"1 access token\(s\) in plain text") as error:
        open_credentials(settings(db))
    assert "FUNNELGATE_SECRET_KEY" in str(error.value) and TOKEN not in str(error.value)
    with raw(db) as conn:  # untouched: the refusal changes nothing
        assert conn.execute("SELECT access_token FROM credentials").fetchone()[0] == TOKEN


def test_plaintext_rows_of_0_1_are_sealed_on_open_and_leave_no_copy(db: Path):
    rows = [("p1", f"u{n}", f"{TOKEN}-{n}", 1_700_000_000 + n) for n in range(50)]
    make_0_1_database(db, rows)
    assert TOKEN.encode() in db.read_bytes()

    store = open_credentials(settings(db, KEY_A))
    try:
        assert store.get("p1", "u7") == f"{TOKEN}-7"
        assert [(i.user_id, i.updated_at) for i in store.list()][:2] == [
            ("u0", 1_700_000_000),
            ("u1", 1_700_000_001),
        ]
        for path in database_files(db):
            assert not path.exists() or TOKEN.encode() not in path.read_bytes(), path
    finally:
        store.close()
    with raw(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_an_empty_0_1_table_is_upgraded_without_a_key(db: Path):
    make_0_1_database(db, [])
    open_credentials(settings(db)).close()
    with raw(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_database_from_a_newer_version_is_refused(db: Path):
    with raw(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigError, match="schema version 99"):
        open_credentials(settings(db))


def test_a_file_that_is_not_a_database_is_a_config_error(db: Path):
    db.write_bytes(b"not a database at all, " * 100)
    with pytest.raises(ConfigError, match=f"storage {db}"):
        open_credentials(settings(db))


def test_key_text_forms_and_refusals():
    material = os.urandom(32)
    forms = [
        base64.urlsafe_b64encode(material).decode(),
        base64.urlsafe_b64encode(material).decode().rstrip("="),
        base64.b64encode(material).decode(),
    ]
    other = new_secret_key()
    parsed = parse_secret_keys(
        f"# newest first\n{forms[0]}, {other}\n  {forms[1]} {forms[2]}\n", "src"
    )
    assert [k.id for k in parsed] == [key_id(material), id_of(other)]  # duplicates dropped
    assert parsed[0].material == material and len(parsed[0].id) == 16
    assert material.hex() not in repr(parsed[0])

    short = base64.b64encode(os.urandom(16)).decode()
    with pytest.raises(ConfigError, match="src: key 2 is not 32 bytes in base64") as error:
        parse_secret_keys(f"{other}\n{short}", "src")
    assert short not in str(error.value) and other not in str(error.value)
    with pytest.raises(ConfigError, match="holds no key"):
        parse_secret_keys("# only a comment\n", "src")


def test_add_secret_key_creates_a_private_file_and_puts_the_new_key_first(
    tmp_path: Path, wide_umask
):
    key_file = tmp_path / "secret.key"
    first = add_secret_key(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = add_secret_key(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    text = key_file.read_text()
    assert text.startswith("# funnelgate secret keys")  # the comments stay on top
    assert [k.id for k in read_secret_key_file(key_file)] == [second.id, first.id]


# funnelgate 0.2's file: one sealed token per user, and an outbox without credential ids.
VERSION_1 = """
CREATE TABLE credentials (project_id TEXT NOT NULL, user_id TEXT NOT NULL, key_id TEXT NOT NULL,
    sealed_token BLOB NOT NULL, updated_at INTEGER NOT NULL, PRIMARY KEY (project_id, user_id));
CREATE TABLE outbox (seq INTEGER PRIMARY KEY, project_id TEXT NOT NULL, user_id TEXT NOT NULL,
    event_id TEXT NOT NULL, event_name TEXT NOT NULL, pixel_id TEXT NOT NULL,
    test_event_code TEXT, expires_at REAL NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL, next_at REAL NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, fbtrace_id TEXT, error BLOB, event BLOB NOT NULL);
CREATE INDEX outbox_held ON outbox (project_id, user_id) WHERE status = 'held';
PRAGMA user_version = 1;
"""


def test_a_version_1_file_gets_credential_ids_and_its_pending_events_keep_their_account(db: Path):
    keyring = Keyring(parse_secret_keys(KEY_A, "test"))
    with raw(db) as conn:
        conn.executescript(VERSION_1)
        for user, token in (("u1", TOKEN), ("u2", OTHER)):
            key, sealed = keyring.seal(token.encode(), credentials_module._context("p1", user))
            conn.execute("INSERT INTO credentials VALUES ('p1', ?, ?, ?, 1700000000)",
                         (user, key, sealed))  # fmt: skip
        for seq, (user, status) in enumerate(
            [("u1", "queued"), ("u1", "held"), ("u1", "delivered"), ("u3", "queued")], 1
        ):
            conn.execute("INSERT INTO outbox VALUES (?, 'p1', ?, ?, 'Lead', 'px', NULL, 9e9, ?, "
                         "0, 0, 0, 0, NULL, NULL, '{}')", (seq, user, f"e{seq}", status))  # fmt: skip

    store = open_credentials(settings(db, KEY_A))
    try:
        first, second = store.list("p1")
        assert (first.user_id, second.user_id) == ("u1", "u2")
        assert all(c.default and c.status == "valid" and c.updated_at == 1700000000
                   for c in (first, second))  # fmt: skip
        assert str(uuid.UUID(first.id)) == first.id != second.id
        assert store.get("p1", "u1") == TOKEN and store.get("p1", "u2") == OTHER
    finally:
        store.close()
    with raw(db) as conn:
        tied = conn.execute("SELECT seq, credential_id FROM outbox ORDER BY seq").fetchall()
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # Pending events of u1 go with u1's credential; finished ones are history; u3 had none
    # (the project's token).
    assert tied == [(1, first.id), (2, first.id), (3, None), (4, None)]
    assert "outbox_held" not in indexes
    open_credentials(settings(db, KEY_A)).close()  # a second start changes nothing
    with raw(db) as conn:
        assert conn.execute("SELECT count(*) FROM credentials").fetchone()[0] == 2


def test_a_write_lock_held_too_long_fails_the_waiting_inserts_and_the_next_goes_through(db: Path):
    """Another process (a CLI replay, say) holds the write lock past the busy timeout: the
    transaction fails before its insert runs. The enqueue waiting for it fails (503
    STORAGE_UNAVAILABLE) instead of waiting forever, and enqueueing works once the lock goes."""
    queue = Outbox(db, clock=lambda: 1_795_000_000.0)
    queue.database._writer._db.execute("PRAGMA busy_timeout=50")  # type: ignore[attr-defined]
    event = {"event_id": "e-1", "event_name": "Lead", "event_time": 1_795_000_000}
    new = NewEvent("p", "u", None, "1", None, event, orjson.dumps(event))

    async def enqueue_twice() -> list[int]:
        with raw(db) as lock:
            lock.execute("BEGIN IMMEDIATE")
            with pytest.raises(StorageUnavailable):
                await queue.enqueue([new])
            lock.execute("ROLLBACK")
        return await asyncio.wait_for(queue.enqueue([new]), 5)

    try:
        assert asyncio.run(enqueue_twice()) == [1]
        assert queue.pending == 1
    finally:
        queue.close()
