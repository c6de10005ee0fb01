"""Config parsing: a mistake stops start-up with one line naming it (the CLI tests run the
same through `funnelgate serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import Config, GraphSettings, parse_config
from server.errors import ConfigError
from tests.support import public_pem


def parse(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, **graph: Any) -> Config:
    raw = {"graph": graph, "projects": [{"id": "p1", "jwt_public_key": public_pem(rsa_key)}]}
    return parse_config(raw, base_dir=tmp_path, env={})


def test_every_graph_key_is_read(tmp_path, rsa_key):
    settings = {"base_url": "http://graph.test/", "api_version": "v23.0", "timeout_seconds": 2,
                "retry_deadline_seconds": 4.5, "max_connections": 7, "coalesce": False,
                "sandbox": True}  # fmt: skip
    assert parse(tmp_path, rsa_key, **settings).graph == GraphSettings(
        base_url="http://graph.test", api_version="v23.0", timeout_seconds=2.0,
        retry_deadline_seconds=4.5, max_connections=7, coalesce=False, sandbox=True)  # fmt: skip


@pytest.mark.parametrize("key", ["timeout", "retry_deadline", "Sandbox", "base-url"])
def test_an_unknown_graph_key_is_refused_by_name(tmp_path, rsa_key, key):
    """A misspelt key would otherwise leave its setting at the default, silently."""
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) in \[graph\]: {key}$"):
        parse(tmp_path, rsa_key, **{key: 1})
