"""The `funnelgate` command as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import free_port, private_pem, public_pem

FUNNELGATE = str(Path(sys.executable).parent / "funnelgate")


def funnelgate(
    *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FUNNELGATE_CONFIG"}
    return subprocess.run(
        [FUNNELGATE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=30,
        env=env,
    )


@pytest.fixture
def project_dir(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "project.pub.pem").write_text(public_pem(rsa_key))
    (tmp_path / "keys" / "project.pem").write_bytes(private_pem(rsa_key))
    (tmp_path / "funnelgate.toml").write_text(
        '[[projects]]\nid = "p1"\njwt_public_key_file = "keys/project.pub.pem"\n'
    )
    return tmp_path


@pytest.mark.parametrize(
    ("config_text", "expected"),
    [
        (None, "cannot read it"),
        ("[[projects]\n", "not valid TOML"),
        (
            '[[projects]]\nid = "p1"\njwt_public_key_file = "missing.pem"\n',
            "cannot read jwt_public_key_file",
        ),
        ('[[projects]]\nid = "p1"\njwt_public_key = "not a pem"\n', "is not a PEM public key"),
        (
            '[graph]\ntimeout_seconds = -1\n[[projects]]\nid = "p1"\njwt_public_key = "x"\n',
            "positive number",
        ),
        (
            '[storage]\nurl = "postgres://x"\n[[projects]]\nid = "p"\njwt_public_key = "x"\n',
            "sqlite:///",
        ),
        ("", "at least one [[projects]]"),
    ],
)
def test_config_errors_stop_startup_with_one_clear_line(tmp_path: Path, config_text, expected):
    config = tmp_path / "funnelgate.toml"
    if config_text is not None:
        config.write_text(config_text)
    result = funnelgate("serve", "--config", str(config), "--port", str(free_port()))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_token_command_mints_a_token_the_project_key_verifies(project_dir: Path, rsa_key):
    result = funnelgate("token", "--config", str(project_dir / "funnelgate.toml"), "--project", "p1",
                        "--user", "alice", "--ttl", "60", "--private-key-file", str(project_dir / "keys/project.pem"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), rsa_key.public_key(), algorithms=["RS256"],
                        audience="useparagon.com/p1")  # fmt: skip
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 60


def test_credentials_set_list_remove_never_print_the_token(project_dir: Path):
    config = str(project_dir / "funnelgate.toml")
    secret = "EAAB-very-secret-user-token"
    (project_dir / "token.txt").write_text(secret + "\n")
    assert funnelgate("credentials", "set", "--config", config, "--project", "p1", "--user", "u1",
                      "--access-token-file", str(project_dir / "token.txt")).returncode == 0  # fmt: skip
    assert funnelgate("credentials", "set", "--config", config, "--project", "p1", "--user", "u2",
                      "--access-token-file", "-", stdin=secret).returncode == 0  # fmt: skip
    listed = funnelgate("credentials", "list", "--config", config)
    assert listed.returncode == 0
    assert [line.split("\t")[:2] for line in listed.stdout.splitlines()] == [
        ["p1", "u1"],
        ["p1", "u2"],
    ]
    assert "secret" not in listed.stdout + listed.stderr
    assert (
        funnelgate(
            "credentials", "remove", "--config", config, "--project", "p1", "--user", "u1"
        ).returncode
        == 0
    )
    assert (
        funnelgate(
            "credentials", "remove", "--config", config, "--project", "p1", "--user", "u1"
        ).returncode
        == 1
    )
    listed = funnelgate("credentials", "list", "--config", config, "--project", "p1")
    assert [line.split("\t")[1] for line in listed.stdout.splitlines()] == ["u2"]
    unknown = funnelgate("credentials", "list", "--config", config, "--project", "nope")
    assert unknown.returncode == 2 and "not in the config" in unknown.stderr


def test_first_run_without_config_prints_a_curl_that_the_sandbox_accepts(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "FUNNELGATE_CONFIG"}
    out = tmp_path / "out.txt"
    with out.open("w") as stdout:
        process = subprocess.Popen([FUNNELGATE, "serve", "--port", str(port)], cwd=tmp_path,
                                   stdout=stdout, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "Uvicorn" not in out.read_text() and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        printed = out.read_text()
        command = re.search(r"^curl .*?'$(?=\n\n)", printed, re.S | re.M)
        assert command, printed
        result = subprocess.run(
            ["bash", "-c", command.group(0)], capture_output=True, text=True, timeout=20
        )
        assert json.loads(result.stdout)["events_received"] == 1
        recorded = httpx.get(f"http://127.0.0.1:{port}/sandbox/events", timeout=5).json()[
            "requests"
        ]
        event = recorded[0]["body"]["data"][0]
        assert event["custom_data"]["content_ids"] == ["ABC123", "XYZ789"]
        assert recorded[0]["body"]["access_token"] == "[redacted]"
        assert (tmp_path / ".funnelgate" / "config.toml").exists()
        assert (
            oct((tmp_path / ".funnelgate" / "keys" / "project.pem").stat().st_mode & 0o777)
            == "0o600"
        )
    finally:
        process.terminate()
        process.wait(timeout=10)
