"""The config file: unknown keys refused in every table, numbers that are numbers, the API
version's form, the [server] table, secret keys, and secrets from files or the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import ServerSettings, load_config, parse_config
from server.errors import ConfigError
from server.storage.crypto import add_secret_key, new_secret_key, parse_secret_keys
from tests.support import public_pem


@pytest.fixture
def write(tmp_path: Path, rsa_key: rsa.RSAPrivateKey):
    """Write a config file (with a valid project appended unless given) and load it."""
    (tmp_path / "project.pub.pem").write_text(public_pem(rsa_key))
    project = '\n[[projects]]\nid = "p1"\njwt_public_key_file = "project.pub.pem"\n'

    def _write(text: str, *, env: dict[str, str] | None = None, with_project: bool = True):
        path = tmp_path / "funnelgate.toml"
        path.write_text(text + (project if with_project else ""))
        return load_config(path, env or {})

    return _write


def refusal(write, text: str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as error:
        write(text, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("text", "table", "key", "hint"),
    [
        ("graf = 1\n", "top level", "graf", "did you mean 'graph'"),
        ("[graf]\nsandbox = true\n", "top level", "graf", "did you mean 'graph'"),
        ("[graph]\ntimeout = 2\n", "[graph]", "timeout", "did you mean 'timeout_seconds'"),
        ("[storage]\npath = 'x.db'\n", "[storage]", "path", "known: url, secret_key_file"),
        ("[server]\nmax_inflight = 9\n", "[server]", "max_inflight", "'max_in_flight'"),
    ],
)
def test_unknown_keys_are_refused_in_every_table(write, text, table, key, hint):
    message = refusal(write, text)
    assert "funnelgate.toml" in message and table in message
    assert f"unknown key {key!r}" in message and hint in message


def test_a_misspelt_project_key_is_refused_with_the_project_named(write):
    message = refusal(
        write,
        '[[projects]]\nid = "p1"\njwt_public_key_file = "project.pub.pem"\n'
        'facebook_acess_token = "EAAB-secret"\n',
        with_project=False,
    )
    assert "funnelgate.toml, [[projects]] #1 ('p1')" in message
    assert "unknown key 'facebook_acess_token' (did you mean 'facebook_access_token'?)" in message
    assert "EAAB-secret" not in message


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("graph", "timeout_seconds"),
        ("delivery", "sync_budget_seconds"),
        ("delivery", "max_queued_events"),
        ("delivery", "max_concurrent_requests"),
        ("storage", "retention_days"),
        ("graph", "max_connections"),
        ("server", "max_in_flight"),
        ("server", "shutdown_seconds"),
    ],
)
@pytest.mark.parametrize("value", ["true", "false"])
def test_booleans_are_refused_where_numbers_are_expected(write, table, key, value):
    message = refusal(write, f"[{table}]\n{key} = {value}\n")
    assert f"[{table}]: {key} must be a positive" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[graph]\nmax_connections = 1.5\n", "max_connections must be a positive integer"),
        ("[server]\nmax_in_flight = 0\n", "max_in_flight must be a positive integer"),
        ("[server]\nshutdown_seconds = 0\n", "shutdown_seconds must be a positive number"),
        ('[delivery]\nmode = "async"\n', 'mode must be "sync" or "queued" (got \'async\')'),
        ("[delivery]\nmax_queued_events = 0\n", "max_queued_events must be a positive integer"),
        ("[delivery]\nmode_ = 1\n", "unknown key 'mode_' (did you mean 'mode'?)"),
        ("[server]\nshutdown_seconds = 'ten'\n", "shutdown_seconds must be a positive number"),
        ("[graph]\nsandbox = 1\n", "sandbox must be true or false"),
        ("[graph]\ncoalesce = 'no'\n", "coalesce must be true or false"),
        ("graph = 3\n", "[graph] must be a table"),
    ],
)
def test_values_of_the_wrong_kind_are_refused(write, text, expected):
    assert expected in refusal(write, text)


@pytest.mark.parametrize("version", ["v24.0", "v3.10", "v100.1"])
def test_api_version_accepts_graph_versions(write, version):
    assert write(f'[graph]\napi_version = "{version}"\n').graph.api_version == version


@pytest.mark.parametrize(
    "version", ["24.0", "v24", "v24.0.1", "V24.0", "v24.0\n", "latest", "v\u0662.\u0660"]
)  # Arabic-Indic digits
def test_api_version_must_look_like_v24_0(write, version):
    literal = version.replace("\n", "\\n")
    message = refusal(write, f'[graph]\napi_version = "{literal}"\n')
    assert "api_version must look like v24.0" in message


def test_server_table_defaults(write):
    assert write("").server == ServerSettings(
        max_in_flight=1024, trusted_proxies=(), shutdown_seconds=10.0
    )


def test_server_table_values(write):
    config = write(
        "[server]\nmax_in_flight = 64\nshutdown_seconds = 2.5\n"
        'trusted_proxies = ["10.0.0.0/8", "127.0.0.1", "::1", "2001:db8::/32"]\n'
    )
    assert config.server == ServerSettings(
        64, ("10.0.0.0/8", "127.0.0.1", "::1", "2001:db8::/32"), 2.5
    )


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('"*"', "'*' is not an IP address or CIDR network"),
        ('"proxy.internal"', "is not an IP address"),
        ('"10.0.0.1/8"', "'10.0.0.1/8' has host bits set (10.0.0.0/8?)"),
        ("8", "8 is not an IP address"),
    ],
)
def test_trusted_proxies_are_ip_addresses_or_networks(write, entry, expected):
    message = refusal(write, f"[server]\ntrusted_proxies = [{entry}]\n")
    assert "[server]: trusted_proxies" in message and expected in message


def test_trusted_proxies_must_be_a_list(write):
    assert "trusted_proxies must be a list" in refusal(
        write, '[server]\ntrusted_proxies = "10.0.0.1"\n'
    )


def test_secret_keys_come_from_the_environment_first_then_the_key_file(write, tmp_path: Path):
    key_file = tmp_path / "secret.key"
    from_file = add_secret_key(key_file)
    storage = write('[storage]\nsecret_key_file = "secret.key"\n').storage
    assert [k.id for k in storage.secret_keys] == [from_file.id]
    assert storage.secret_key_file == key_file

    new, old = new_secret_key(), new_secret_key()
    env = {"FUNNELGATE_SECRET_KEY": f"{new}, {old}"}
    storage = write('[storage]\nsecret_key_file = "secret.key"\n', env=env).storage
    assert [k.id for k in storage.secret_keys] == [
        parse_secret_keys(k, "t")[0].id for k in (new, old)
    ]
    assert storage.secret_key_file is None and storage.secret_key_origin == "FUNNELGATE_SECRET_KEY"

    assert write("").storage.secret_keys == ()


def test_secret_key_problems_are_one_line_without_the_key(write):
    message = refusal(write, '[storage]\nsecret_key_file = "missing.key"\n')
    assert "[storage]: cannot read secret_key_file" in message and "missing.key" in message
    bad = "c2hvcnQ="  # 5 bytes
    message = refusal(write, "", env={"FUNNELGATE_SECRET_KEY": bad})
    assert "FUNNELGATE_SECRET_KEY: key 1 is not 32 bytes" in message and bad not in message


def test_project_secrets_from_a_file_the_environment_or_inline(write, tmp_path: Path):
    (tmp_path / "token.txt").write_text("EAAB-from-a-file\n")
    (tmp_path / "app-secret.txt").write_text("  app-secret-from-file  ")
    base = '[[projects]]\nid = "p1"\njwt_public_key_file = "project.pub.pem"\n'
    project = write(
        base
        + 'facebook_access_token_file = "token.txt"\nfacebook_app_secret_file = "app-secret.txt"\n',
        with_project=False,
    ).projects["p1"]
    assert (project.facebook_access_token, project.facebook_app_secret) == (
        "EAAB-from-a-file",
        "app-secret-from-file",
    )

    env = {"META_TOKEN": "EAAB-from-env", "META_APP_SECRET": "s3cret"}
    project = write(
        base + 'facebook_access_token_env = "META_TOKEN"\nfacebook_app_secret_env = "META_APP_SECRET"\n',
        env=env, with_project=False,
    ).projects["p1"]  # fmt: skip
    assert (project.facebook_access_token, project.facebook_app_secret) == (
        "EAAB-from-env",
        "s3cret",
    )

    project = write(base + 'facebook_access_token = "EAAB-inline"\n', with_project=False).projects[
        "p1"
    ]
    assert project.facebook_access_token == "EAAB-inline"
    assert "EAAB" not in repr(project)


@pytest.mark.parametrize(
    ("lines", "env", "expected"),
    [
        ('facebook_access_token = "a"\nfacebook_access_token_env = "T"\n', {"T": "b"},
         "set only one of facebook_access_token, facebook_access_token_env"),
        ('facebook_access_token_env = "UNSET_VAR"\n', {}, "the environment variable UNSET_VAR is not set"),
        ('facebook_access_token_env = "EMPTY"\n', {"EMPTY": " "}, "the environment variable EMPTY is not set"),
        ('facebook_app_secret_file = "nope.txt"\n', {}, "cannot read facebook_app_secret_file"),
        ('facebook_access_token_file = "empty.txt"\n', {}, "must hold one secret"),
    ],
)  # fmt: skip
def test_project_secret_problems_are_named(write, tmp_path: Path, lines, env, expected):
    (tmp_path / "empty.txt").write_text("\n")
    base = '[[projects]]\nid = "p1"\njwt_public_key_file = "project.pub.pem"\n'
    message = refusal(write, base + lines, env=env, with_project=False)
    assert "[[projects]] #1 ('p1')" in message and expected in message


def test_parse_config_without_a_file_names_the_table(rsa_key: rsa.RSAPrivateKey, tmp_path: Path):
    raw = {"storage": {"url": "sqlite:///x.db", "extra": 1},
           "projects": [{"id": "p", "jwt_public_key": public_pem(rsa_key)}]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"^config, \[storage\]: unknown key 'extra'"):
        parse_config(raw, base_dir=tmp_path, env={})


def test_a_network_written_another_way_is_accepted_in_its_normal_form(write):
    server = write('[server]\ntrusted_proxies = ["2001:DB8::/32", "10.0.0.0/08"]\n').server
    assert server.trusted_proxies == ("2001:db8::/32", "10.0.0.0/8")


def test_delivery_mode_is_global_and_per_project(write):
    config = write(
        '[delivery]\nmode = "queued"\n\n[[projects]]\nid = "p0"\n'
        'jwt_public_key_file = "project.pub.pem"\ndelivery_mode = "sync"\n'
    )
    assert config.delivery.mode == "queued"
    assert config.delivery_mode(config.projects["p0"]) == "sync"
    assert config.delivery_mode(config.projects["p1"]) == "queued"
    message = refusal(write, '[[projects]]\nid = "p0"\njwt_public_key_file = "project.pub.pem"\n'
                             'delivery_mode = "later"\n')  # fmt: skip
    assert 'delivery_mode must be "sync" or "queued" (got \'later\')' in message
