"""The credential store: a real SQLite file that only its owner can read (it holds tokens)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from server.storage.credentials import CredentialStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_database_file_is_created_owner_only(tmp_path: Path):
    path = tmp_path / "data" / "funnelgate.db"
    store = CredentialStore(path)
    try:
        store.set("p1", "u1", "EAAB-secret")
    finally:
        store.close()
    assert mode(path) == 0o600


def test_an_existing_database_file_is_made_owner_only(tmp_path: Path):
    path = tmp_path / "funnelgate.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    CredentialStore(path).close()
    assert mode(path) == 0o600


@pytest.mark.xfail(
    reason="SQLite creates -wal and -shm with the database file's mode when WAL mode is "
    "switched on, before the chmod: they hold tokens readable by others until the file is "
    "created 0600 first",
    strict=True,
)
def test_the_write_ahead_log_is_owner_only_too(tmp_path: Path):
    path = tmp_path / "funnelgate.db"
    store = CredentialStore(path)
    try:
        store.set("p1", "u1", "EAAB-secret")
        assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
            "funnelgate.db": 0o600, "funnelgate.db-wal": 0o600, "funnelgate.db-shm": 0o600}  # fmt: skip
    finally:
        store.close()


def test_set_get_remove_list(tmp_path: Path):
    store = CredentialStore(tmp_path / "funnelgate.db")
    try:
        store.set("p1", "u1", "EAAB-1")
        store.set("p1", "u1", "EAAB-2")  # replaces
        store.set("p2", "u1", "EAAB-3")
        assert (store.get("p1", "u1"), store.get("p1", "nobody")) == ("EAAB-2", None)
        assert [(c.project_id, c.user_id) for c in store.list()] == [("p1", "u1"), ("p2", "u1")]
        assert [c.project_id for c in store.list("p2")] == ["p2"]
        assert store.remove("p1", "u1") is True
        assert store.remove("p1", "u1") is False
        assert store.get("p1", "u1") is None
    finally:
        store.close()
