"""A real PostgreSQL for the tests: FUNNELGATE_TEST_DATABASE_URL's server when it names one,
else a throwaway server started from the `pgserver` wheel (PostgreSQL's own binaries, no
install, no container) in a temporary directory, stopped when the tests end.

Each test gets a database of its own on that server (`fresh_database`), dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ENV_VAR = "FUNNELGATE_TEST_DATABASE_URL"


class Server:
    """A PostgreSQL server the tests may use: its admin URL, and for a pgserver one, its data
    directory (the fault tests stop and start it)."""

    def __init__(self, url: str, pg: Any = None, root: Path | None = None) -> None:
        self.url = url
        self.pg = pg
        self.root = root

    def database_url(self, name: str) -> str:
        params = conninfo_to_dict(self.url)
        params["dbname"] = name
        return "postgresql://?" + "&".join(f"{k}={v}" for k, v in params.items() if v is not None)

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[str]:
        name = f"fg_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.database_url(name)
        finally:
            with psycopg.connect(self.url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.pg is not None:
            self.pg.cleanup()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> Server:
    """The server FUNNELGATE_TEST_DATABASE_URL names, else a new pgserver one."""
    if url := os.environ.get(ENV_VAR, "").strip():
        return Server(make_conninfo(url))
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (a CI machine's normal state).
        warnings.simplefilter("ignore")
        import pgserver

    # A short path: the server's unix socket lives in it (at most 107 bytes on Linux).
    root = Path(tempfile.mkdtemp(prefix="fgpg-", dir="/tmp"))
    pg = pgserver.get_server(root / "data", cleanup_mode="stop")  # type: ignore[attr-defined]
    return Server(pg.get_uri(), pg, root)
