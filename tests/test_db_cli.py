"""`funnelgate db upgrade` and the database URL: both backends, the environment's URL winning
over the file's, a password never printed."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from server.config import load_config
from server.errors import ConfigError
from server.storage import schema_pg
from server.storage.credentials import SCHEMA_VERSION
from server.storage.crypto import add_secret_key
from tests.support import public_pem
from tests.test_cli import clean_env, funnelgate


@pytest.fixture
def project_dir(tmp_path: Path, rsa_key) -> Path:
    (tmp_path / "project.pub.pem").write_text(public_pem(rsa_key))
    add_secret_key(tmp_path / "secret.key")
    (tmp_path / "funnelgate.toml").write_text(
        '[storage]\nsecret_key_file = "secret.key"\n'
        '[[projects]]\nid = "p1"\njwt_public_key_file = "project.pub.pem"\n'
    )
    return tmp_path


def test_db_upgrade_brings_a_new_sqlite_file_up_and_then_finds_it_done(project_dir: Path):
    config = str(project_dir / "funnelgate.toml")
    first = funnelgate("db", "upgrade", "--config", config)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().endswith(f"schema version 0 -> {SCHEMA_VERSION}")
    again = funnelgate("db", "upgrade", "--config", config)
    assert again.stdout.strip().endswith(f"schema version {SCHEMA_VERSION}, up to date")
    assert (project_dir / "funnelgate.db").exists()


def test_db_upgrade_on_postgresql_from_the_environment(project_dir: Path, postgres_url: str):
    config = str(project_dir / "funnelgate.toml")
    env = clean_env(FUNNELGATE_DATABASE_URL=postgres_url)
    first = funnelgate("db", "upgrade", "--config", config, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("postgresql ")
    assert first.stdout.strip().endswith(f"schema version 0 -> {schema_pg.VERSION}")
    again = funnelgate("db", "upgrade", "--config", config, env=env)
    assert again.stdout.strip().endswith(f"schema version {schema_pg.VERSION}, up to date")
    assert not (project_dir / "funnelgate.db").exists()  # the file was not the one used
    with psycopg.connect(postgres_url) as db:
        tables = {row[0] for row in db.execute("SELECT tablename FROM pg_tables")}
    assert {"outbox", "credentials", "idempotency", "minute_events", "breakers"} <= tables


def test_a_database_newer_than_this_funnelgate_is_refused(project_dir: Path, postgres_url: str):
    env = clean_env(FUNNELGATE_DATABASE_URL=postgres_url)
    config = str(project_dir / "funnelgate.toml")
    assert funnelgate("db", "upgrade", "--config", config, env=env).returncode == 0
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE funnelgate_schema SET version = version + 1")
    refused = funnelgate("db", "upgrade", "--config", config, env=env)
    assert refused.returncode == 2
    assert "made by a newer funnelgate" in refused.stderr


def test_an_unreachable_database_is_one_line_without_the_password(project_dir: Path):
    url = "postgresql://funnelgate:s3cret-pw@127.0.0.1:1/funnelgate?connect_timeout=2"
    result = funnelgate(
        "db", "upgrade", "--config", str(project_dir / "funnelgate.toml"),
        env=clean_env(FUNNELGATE_DATABASE_URL=url),
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "postgresql 127.0.0.1/funnelgate" in lines[0], result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:pw@h/db?sslmode=require", None),
        ("postgresql://u:pw@h/db?no_such_option=1", "not a valid postgresql:// connection URI"),
        ("mysql://u@h/db", "url must be sqlite:///PATH or postgresql://"),
    ],
)
def test_the_database_url_is_checked_when_the_config_loads(
    tmp_path: Path, rsa_key, url: str, expected: str | None
):
    config = tmp_path / "funnelgate.toml"
    (tmp_path / "p.pem").write_text(public_pem(rsa_key))
    config.write_text(
        f'[storage]\nurl = "{url}"\n[[projects]]\nid = "p"\njwt_public_key_file = "p.pem"\n'
    )
    try:
        loaded = load_config(config, env={})
    except Exception as exc:
        assert expected is not None and expected in str(exc)
        assert "pw" not in str(exc)
    else:
        assert expected is None
        assert loaded.storage.url == url
        assert "pw" not in repr(loaded.storage)


def test_a_wrong_scheme_names_only_the_scheme_and_where_it_came_from(tmp_path: Path, rsa_key):
    (tmp_path / "p.pem").write_text(public_pem(rsa_key))
    config = tmp_path / "funnelgate.toml"
    config.write_text('[[projects]]\nid = "p"\njwt_public_key_file = "p.pem"\n')
    url = "postgresql+psycopg://fg:s3cret@db/fg"  # SQLAlchemy's form, pasted
    with pytest.raises(ConfigError) as raised:
        load_config(config, env={"FUNNELGATE_DATABASE_URL": url})
    assert "s3cret" not in str(raised.value)
    assert "FUNNELGATE_DATABASE_URL" in str(raised.value)
    assert "'postgresql+psycopg'" in str(raised.value)
