"""A real PostgreSQL for the tests: FUNNELGATE_TEST_DATABASE_URL's server when it names one,
else a throwaway server started from the `pgserver` wheel (PostgreSQL's own binaries, no
install, no container) in a temporary directory, stopped when the tests end.

Each test gets a database of its own on that server (`fresh_database`), dropped afterwards.
A pgserver one can be stopped and started again on the same socket (`stop_postgres`,
`start_postgres`: the fault tests' database outage).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
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

    @property
    def restartable(self) -> bool:
        """Whether the tests can stop and start it (a pgserver one, in its data directory)."""
        return self.pg is not None

    def stop_postgres(self) -> None:
        """Stops the server, keeping its data: pg_ctl's fast shutdown ends every session (as
        an outage does), https://www.postgresql.org/docs/current/app-pg-ctl.html."""
        self._pg_ctl("-m", "fast", "stop")

    def start_postgres(self) -> None:
        """Starts it again, as pgserver started it: the same data directory, unix socket
        directory and port, so the URLs handed out before work again; returns once it
        accepts connections."""
        before = self.url
        self.pg.ensure_postgres_running()  # pgserver's own start (pg_ctl start -w)
        assert self.pg.get_uri() == before, (self.pg.get_uri(), before)

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        assert self.pg is not None, "only a pgserver server can be stopped by the tests"
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pg.pgdata), "-w", *args],
            check=True, capture_output=True, timeout=60, user=self.pg.system_user,
        )  # fmt: skip

    def stop(self) -> None:
        if self.pg is not None:
            self.pg.cleanup()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> Server:
    """The server FUNNELGATE_TEST_DATABASE_URL names, else a new pgserver one."""
    if url := os.environ.get(ENV_VAR, "").strip():
        return Server(make_conninfo(url))
    return start_pgserver()


def start_pgserver() -> Server:
    """A new throwaway pgserver server in a temporary directory (`stop` removes it)."""
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (a CI machine's normal state).
        warnings.simplefilter("ignore")
        import pgserver

    # A short path: the server's unix socket lives in it (at most 107 bytes on Linux).
    root = Path(tempfile.mkdtemp(prefix="fgpg-", dir="/tmp"))
    pg = pgserver.get_server(root / "data", cleanup_mode="stop")  # type: ignore[attr-defined]
    return Server(pg.get_uri(), pg, root)
