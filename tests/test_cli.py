"""The `funnelgate` command as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import load_config
from server.storage.credentials import mark_invalid, open_credentials, write_uses
from server.storage.crypto import add_secret_key, new_secret_key
from tests.live import serving
from tests.support import WallClockGraph as FakeGraphServer
from tests.support import free_port, funnel_parameters, private_pem, public_pem, wait_ready

FUNNELGATE = str(Path(sys.executable).parent / "funnelgate")


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without funnelgate's own variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNNELGATE_")}
    return {**env, **extra}


def funnelgate(
    *args: str, cwd: Path | None = None, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FUNNELGATE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=30,
        env=env or clean_env(),
    )


@pytest.fixture
def project_dir(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "project.pub.pem").write_text(public_pem(rsa_key))
    (tmp_path / "keys" / "project.pem").write_bytes(private_pem(rsa_key))
    add_secret_key(tmp_path / "secret.key")
    (tmp_path / "funnelgate.toml").write_text(
        '[storage]\nsecret_key_file = "secret.key"\n'
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
            '[storage]\nurl = "mysql://x"\n[[projects]]\nid = "p"\njwt_public_key = "x"\n',
            "sqlite:///",
        ),
        ("", "at least one [[projects]]"),
        (
            '[[projects]]\nid = "p1"\njwt_public_key = "x"\nfacebook_acess_token = "EAAB-x"\n',
            "unknown key 'facebook_acess_token' (did you mean 'facebook_access_token'?)",
        ),
        ('[graf]\nsandbox = true\n[[projects]]\nid = "p"\n', "unknown key 'graf'"),
        ("[graph]\nmax_connections = true\n", "max_connections must be a positive integer"),
        ('[graph]\napi_version = "24.0"\n', "api_version must look like v24.0"),
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
        ["PROJECT", "USER"],
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
    assert [line.split("\t")[1] for line in listed.stdout.splitlines()] == ["USER", "u2"]
    unknown = funnelgate("credentials", "list", "--config", config, "--project", "nope")
    assert unknown.returncode == 2 and "not in the config" in unknown.stderr


def credentials(
    project_dir: Path, action: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`funnelgate credentials ACTION` on project p1 of `project_dir`'s config."""
    return funnelgate("credentials", action, "--config", str(project_dir / "funnelgate.toml"),
                      "--project", "p1", *args, stdin=stdin)  # fmt: skip


def set_token(project_dir: Path, user: str, token: str, *args: str) -> str:
    """`credentials set` with the token on stdin; the id it printed."""
    result = credentials(project_dir, "set", "--user", user, "--access-token-file", "-", *args,
                         stdin=token)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return _found(r"credential ([0-9a-f-]{36}) \(", result.stdout)


def listed(project_dir: Path, *args: str) -> list[dict[str, str]]:
    result = credentials(project_dir, "list", *args)
    assert result.returncode == 0, result.stderr
    return table_rows(result.stdout)


def test_credentials_set_makes_a_credential_with_a_new_uuid_and_prints_it(project_dir: Path):
    first = credentials(project_dir, "set", "--user", "u1", "--access-token-file", "-",
                        stdin="EAAB-first")  # fmt: skip
    assert first.returncode == 0, first.stderr
    made = _found(r"^stored the access token of credential (\S+) ", first.stdout)
    assert uuid.UUID(made).version == 4 and str(uuid.UUID(made)) == made
    assert first.stdout == (
        f"stored the access token of credential {made} (user 'u1', project 'p1', default; "
        "encrypted); no held events resumed\n"
    )
    second = set_token(project_dir, "u1", "EAAB-second", "--new")  # another account
    assert set_token(project_dir, "u1", "EAAB-first-renewed") == made  # naming none: the default
    chosen = uuid.uuid4()
    given = set_token(project_dir, "u1", "EAAB-third", "--credential-id", str(chosen).upper())
    assert given == str(chosen)  # canonical, as X-Paragon-Credential will name it
    assert len({made, second, given}) == 3
    assert {row["ID"]: row["DEFAULT"] for row in listed(project_dir)} == {
        made: "true", second: "false", given: "false",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("set", "--credential-id", "not-a-uuid"), "--credential-id must be a UUID"),
        (("set", "--credential-id", ""), "--credential-id must be a UUID"),
        (("set", "--credential-id", "ext:acct-a"), "--credential-id must be a UUID"),
        (("remove", "--credential-id", "1234"), "--credential-id must be a UUID"),
        (("remove", "--user", "u1", "--credential-id", ""), "--credential-id must be a UUID"),
        (("set", "--external-id", "line\nbreak"), "--external-id must be 1 to 196 printable ASCII"),
        (("set", "--external-id", " padded"), "without spaces at either end"),
        (("set", "--external-id", "josé@example.com"), "printable ASCII characters"),
        (("set", "--external-id", "x" * 197), "--external-id must be 1 to 196"),
        (("set", "--external-id", ""), "--external-id must be 1 to 196"),
        (("set", "--label", "tab\there"), "--label must be 1 to 196 printable characters"),
        (("set", "--label", "x" * 197), "--label must be 1 to 196 printable characters"),
        (("remove", "--external-id", "acct-a"), "--external-id needs --user"),
        (("remove", "--user", "u1", "--external-id", ""), "--external-id must be 1 to 196"),
        (("remove",), "name the credentials: --credential-id, or --user"),
    ],
)
def test_bad_credential_options_are_one_line_and_change_nothing(project_dir: Path, args, message):
    config = load_config(project_dir / "funnelgate.toml", {})
    with closing(open_credentials(config.storage)) as store:
        kept, _ = store.set("p1", "u1", "EAAB-kept")
    action, *rest = args
    token = ("--user", "u1", "--access-token-file", "-") if action == "set" else ()
    result = credentials(project_dir, action, *token, *rest, stdin="EAAB-never-stored")
    assert (result.returncode, result.stdout) == (2, "")
    [line] = result.stderr.splitlines()
    assert line.startswith("funnelgate: ") and message in line, line
    assert "EAAB" not in line
    with closing(open_credentials(config.storage)) as store:
        assert store.list() == [kept]


def backdate(project_dir: Path, seconds_ago: dict[str, int]) -> None:
    """Sets credentials' updated_at, so "the most recently updated" is not a tie."""
    db = sqlite3.connect(project_dir / "funnelgate.db")
    with closing(db), db:
        db.executemany(
            "UPDATE credentials SET updated_at = ? WHERE credential_id = ?",
            [(int(time.time()) - ago, credential) for credential, ago in seconds_ago.items()],
        )


def test_the_first_credential_is_the_default_until_another_is_made_it(project_dir: Path):
    def defaults() -> dict[str, str]:
        return {row["ID"]: row["DEFAULT"] for row in listed(project_dir, "--user", "u1")}

    first = set_token(project_dir, "u1", "EAAB-a")
    second = set_token(project_dir, "u1", "EAAB-b", "--new")
    third = set_token(project_dir, "u1", "EAAB-c", "--new", "--default", "--label", "Brand")
    other = set_token(project_dir, "u2", "EAAB-d")  # another user's: its own default
    assert defaults() == {first: "false", second: "false", third: "true"}
    moved = set_token(project_dir, "u1", "EAAB-a2", "--credential-id", first, "--default")
    assert moved == first and defaults() == {first: "true", second: "false", third: "false"}

    # Removing the default promotes the most recently updated other one, not the oldest.
    backdate(project_dir, {first: 300, second: 100, third: 200})
    removed = credentials(project_dir, "remove", "--credential-id", first)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == [
        f"removed credential {first} of user 'u1'; no held events failed (INTEGRATION_NOT_ENABLED)",
        f"credential {second} is now the default of user 'u1'",
    ]
    assert defaults() == {second: "true", third: "false"}
    removed = credentials(project_dir, "remove", "--credential-id", third)  # not the default
    assert removed.returncode == 0 and len(removed.stdout.splitlines()) == 1
    assert defaults() == {second: "true"}
    assert [(row["ID"], row["DEFAULT"]) for row in listed(project_dir, "--user", "u2")] == [
        (other, "true")
    ]


def test_list_shows_ids_labels_default_status_and_last_use_never_the_token(project_dir: Path):
    tokens = ["EAAB-listed-secret-a1", "EAAB-listed-secret-b2"]
    agency = set_token(project_dir, "u1", tokens[0], "--external-id", "acct-a", "--label",
                       "Agency BM")  # fmt: skip
    brand = set_token(project_dir, "u1", tokens[1], "--new")
    refusal = {"code": "CREDENTIAL_REFUSED", "message": "Meta refused the access token.",
               "upstream": {"code": 190, "error_subcode": 463, "fbtrace_id": "AbC"}}  # fmt: skip
    db = sqlite3.connect(project_dir / "funnelgate.db")
    with closing(db), db:
        mark_invalid(db, "p1", brand, refusal)
        write_uses(db, [(1_800_000_000, "p1", agency)])

    text = credentials(project_dir, "list")
    rows = table_rows(text.stdout)
    assert text.stdout.splitlines()[0] == (
        "PROJECT\tUSER\tID\tEXTERNAL_ID\tLABEL\tDEFAULT\tSTATUS\tREFUSED\tLAST_USED\tUPDATED\tKEY"
    )
    shown = ("ID", "EXTERNAL_ID", "LABEL", "DEFAULT", "STATUS", "REFUSED", "LAST_USED")
    assert {row["ID"]: {name: row[name] for name in shown[1:]} for row in rows} == {
        agency: {"EXTERNAL_ID": "acct-a", "LABEL": "Agency BM", "DEFAULT": "true",
                 "STATUS": "valid", "REFUSED": "-", "LAST_USED": "2027-01-15T08:00:00Z"},
        brand: {"EXTERNAL_ID": "-", "LABEL": "-", "DEFAULT": "false",
                "STATUS": "invalid", "REFUSED": "190", "LAST_USED": "-"},
    }  # fmt: skip

    as_json = credentials(project_dir, "list", "--json")
    objects = {o["id"]: o for o in map(json.loads, as_json.stdout.splitlines())}
    assert len(objects) == len(as_json.stdout.splitlines()) == 2  # one object per line
    assert objects[agency]["default"] is True
    assert objects[agency]["last_used"] == "2027-01-15T08:00:00Z"
    assert objects[brand]["status"] == "invalid" and objects[brand]["error"] == refusal
    assert set(objects[brand]) == {
        "project", "user", "id", "external_id", "label", "default", "status", "refused",
        "last_used", "updated", "key", "error",
    }  # fmt: skip

    one_user = credentials(project_dir, "list", "--user", "u2")
    assert (one_user.returncode, one_user.stdout) == (1, "")
    assert one_user.stderr == "funnelgate: no credentials matched\n"
    for result in (text, as_json, one_user):
        for token in tokens:
            assert token not in result.stdout + result.stderr


def test_remove_by_id_by_external_id_or_all_of_a_users(project_dir: Path):
    a = set_token(project_dir, "u1", "EAAB-a", "--external-id", "acct-a")
    b = set_token(project_dir, "u1", "EAAB-b", "--external-id", "acct-b")
    c = set_token(project_dir, "u1", "EAAB-c", "--new")
    e = set_token(project_dir, "u1", "EAAB-e", "--new", "--label", "Brand")
    d = set_token(project_dir, "u2", "EAAB-d", "--external-id", "acct-a")  # same ext, other user

    def ids() -> set[str]:
        return {row["ID"] for row in listed(project_dir)}

    def gone(*args: str) -> str:
        result = credentials(project_dir, "remove", *args)
        assert result.returncode == 0, result.stderr
        return _found(r"^removed credential (\S+) ", result.stdout, re.M)

    assert gone("--user", "u1", "--external-id", "acct-a") == a and ids() == {b, c, d, e}
    assert gone("--credential-id", b) == b and ids() == {c, d, e}
    stray = str(uuid.uuid4())
    for args, message in [
        (("--credential-id", d, "--user", "u1"), f"no credential {d} of user 'u1'"),
        (("--credential-id", stray), f"no credential {stray}"),
        (("--user", "u1", "--external-id", "acct-b"), "no credential ext:acct-b of user 'u1'"),
        (("--user", "u3"), "no credentials of user 'u3'"),
    ]:
        unknown = credentials(project_dir, "remove", *args)
        assert (unknown.returncode, unknown.stdout) == (1, ""), args
        assert unknown.stderr == f"funnelgate: {message} in project 'p1'\n"
    all_of_u1 = credentials(project_dir, "remove", "--user", "u1")
    assert all_of_u1.returncode == 0, all_of_u1.stderr
    assert set(re.findall(r"^removed credential (\S+) ", all_of_u1.stdout, re.M)) == {c, e}
    assert "now the default" not in all_of_u1.stdout
    assert ids() == {d}


def test_first_run_without_config_prints_a_curl_that_the_sandbox_accepts(tmp_path: Path):
    port = free_port()
    env = clean_env()
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
        # The console is on, with the admin token printed at start (only its hash is kept).
        console = re.search(rf"(http://127.0.0.1:{port}/console) \(admin token, .*?: (\S+)\)",
                            printed)  # fmt: skip
        assert console, printed
        token = console.group(2)
        assert token not in (tmp_path / ".funnelgate" / "console.token").read_text()
        with httpx.Client(base_url=console.group(1), timeout=5) as browser:
            origin = {"Origin": f"http://127.0.0.1:{port}"}
            login = browser.post("/login", data={"token": token}, headers=origin)
            assert login.status_code == 303
            assert 'data-page="overview"' in browser.get("").text
        for private in ("keys/project.pem", "secret.key", "config.toml"):
            assert oct((tmp_path / ".funnelgate" / private).stat().st_mode & 0o777) == "0o600"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_version():
    result = funnelgate("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"funnelgate \d+\.\d+\.\d+\S*\n", result.stdout)


@pytest.mark.parametrize("ttl", ["0", "-60"])
def test_token_lifetime_must_be_positive(project_dir: Path, ttl: str):
    result = funnelgate("token", "--config", str(project_dir / "funnelgate.toml"), "--project", "p1",
                        "--user", "alice", "--ttl", ttl, "--private-key-file", str(project_dir / "keys/project.pem"))  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"funnelgate: the token lifetime must be a positive number of seconds (got {ttl})"
    ]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_init_creates_keys_and_a_starter_config_that_serves_and_never_overwrites(tmp_path: Path):
    root = tmp_path / "site"
    result = funnelgate("init", str(root))
    assert result.returncode == 0, result.stderr
    config = root / "config.toml"
    text = config.read_text()
    project_id = _found(r'^id = "([0-9a-f-]{36})"$', text, re.M)
    assert project_id in result.stdout and "funnelgate serve --config" in result.stdout
    assert "sandbox = true" not in text.replace("# sandbox = true", "")
    assert (mode(root / "keys/project.pem"), mode(root / "secret.key"), mode(config)) == (
        0o600,
    ) * 3
    for secret in ((root / "keys/project.pem").read_text(), (root / "secret.key").read_text()):
        key_lines = [
            line for line in secret.splitlines() if line and not line.startswith(("#", "-----"))
        ]
        assert not any(line in result.stdout for line in key_lines)

    # the generated key pair signs tokens the config verifies, the secret key seals credentials
    minted = funnelgate("token", "--config", str(config), "--project", project_id, "--user", "u",
                        "--private-key-file", str(root / "keys/project.pem"))  # fmt: skip
    assert minted.returncode == 0, minted.stderr
    stored = funnelgate("credentials", "set", "--config", str(config), "--project", project_id,
                        "--user", "u", "--access-token-file", "-", stdin="EAAB-init-token")  # fmt: skip
    assert stored.returncode == 0, stored.stderr

    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    again = funnelgate("init", str(root))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"funnelgate: {config} already exists: init never overwrites a file"
    ]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def started_summary(config: Path, env: dict[str, str] | None = None) -> str:
    """The line `serve` prints before it starts; the process is stopped once it is out."""
    with subprocess.Popen([FUNNELGATE, "serve", "--config", str(config), "--port", str(free_port())],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env or clean_env()) as process:  # fmt: skip
        try:
            assert process.stderr is not None
            return process.stderr.readline().rstrip("\n")  # bounded by the test timeout
        finally:
            process.terminate()
            process.wait(timeout=10)


def test_serve_prints_a_one_line_summary(project_dir: Path):
    config = project_dir / "funnelgate.toml"
    config.write_text(
        config.read_text()
        + '[[projects]]\nid = "p2"\njwt_public_key_file = "keys/project.pub.pem"\n'
        'facebook_access_token = "EAAB-summary-secret"\n'
    )
    line = started_summary(config, clean_env(FUNNELGATE_GRAPH_BASE_URL="http://127.0.0.1:9"))
    assert re.fullmatch(
        r"funnelgate \S+ on http://127\.0\.0\.1:\d+: 2 project\(s\) \(p1, p2\); "
        r"Graph http://127\.0\.0\.1:9 v24\.0; sandbox off",
        line,
    ), line


def test_a_real_config_with_the_sandbox_on_is_a_warning(project_dir: Path):
    config = project_dir / "funnelgate.toml"
    config.write_text("[graph]\nsandbox = true\n" + config.read_text())
    line = started_summary(config)
    assert "Graph the built-in sandbox v24.0" in line
    assert line.endswith(
        "WARNING: sandbox ON, events go to the built-in sandbox and never reach Meta"
    )


def test_serve_freezes_start_up_objects_once_the_app_has_started(project_dir: Path):
    """gc.freeze() belongs to the serving process; a stand-in main loop reports and stops."""
    code = (
        "import gc, sys\n"
        "import uvicorn.server\n"
        "async def report_and_stop(self):\n"
        "    print('frozen', gc.get_freeze_count(), flush=True)\n"
        "    self.should_exit = True\n"
        "uvicorn.server.Server.main_loop = report_and_stop\n"
        "from server.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "serve", "--config", str(project_dir / "funnelgate.toml"),
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) > 10_000


async def echo_client(scope, receive, send) -> None:
    """What the app sees of the caller: its address and scheme."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = json.dumps({"client": scope["client"][0], "scheme": scope["scheme"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize(
    ("proxies", "seen"),
    [
        ("[]", {"client": "127.0.0.1", "scheme": "http"}),
        ('["10.0.0.0/8"]', {"client": "127.0.0.1", "scheme": "http"}),
        ('["127.0.0.1"]', {"client": "203.0.113.9", "scheme": "https"}),
        ('["127.0.0.0/8", "::1"]', {"client": "203.0.113.9", "scheme": "https"}),
    ],
)
def test_forwarded_headers_are_believed_only_from_trusted_proxies(project_dir: Path, proxies, seen):
    import threading

    import uvicorn

    from server.cli import uvicorn_config

    path = project_dir / "funnelgate.toml"
    path.write_text(
        f"[server]\ntrusted_proxies = {proxies}\nshutdown_seconds = 7\n" + path.read_text()
    )
    settings = uvicorn_config(echo_client, load_config(path, {}), "127.0.0.1", free_port())
    assert settings.timeout_graceful_shutdown == 3  # half of 7 s, whole seconds
    assert settings.proxy_headers is (proxies != "[]")  # no trusted proxy: no rewrite at all
    server = uvicorn.Server(settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        answer = httpx.get(f"http://127.0.0.1:{settings.port}/", timeout=5,
                           headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})  # fmt: skip
        assert answer.json() == seen
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def database_files(db: Path) -> list[Path]:
    return [db.with_name(db.name + suffix) for suffix in ("", "-wal", "-shm")]


def assert_private_and_sealed(db: Path, secrets: list[str], *, all_three: bool) -> None:
    """Every database file there is: mode 0600, and not one raw byte of any token."""
    files = [path for path in database_files(db) if path.exists()]
    assert files[0] == db and (len(files) == 3 or not all_three), files
    for path in files:
        assert mode(path) == 0o600, path
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, (path, secret)


def user_token(key: rsa.RSAPrivateKey, user: str, project: str = "p1") -> str:
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + 600, "aud": f"useparagon.com/{project}"}
    return jwt.encode(claims, key, algorithm="RS256")


def test_tokens_are_encrypted_in_every_file_and_rotate_while_serving(project_dir: Path, rsa_key):
    config, db = project_dir / "funnelgate.toml", project_dir / "funnelgate.db"
    key_file = project_dir / "secret.key"
    old_key_lines = [line for line in key_file.read_text().splitlines() if not line.startswith("#")]
    first, second = "EAAB-first-user-secret-1f2e3d", "EAAB-second-user-secret-7a8b9c"

    def store(user: str, token: str) -> None:
        result = funnelgate("credentials", "set", "--config", str(config), "--project", "p1",
                            "--user", user, "--access-token-file", "-", stdin=token)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert token not in result.stdout + result.stderr

    store("u1", first)
    assert_private_and_sealed(db, [first], all_three=False)  # the CLI has closed the database

    fake = FakeGraphServer()
    with serving(fake.app(), lifespan="off") as graph_url:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = project_dir / "server.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen([FUNNELGATE, "serve", "--config", str(config), "--port", str(port)],
                                       stdout=log_file, stderr=subprocess.STDOUT,
                                       env=clean_env(FUNNELGATE_GRAPH_BASE_URL=graph_url))  # fmt: skip
        try:
            wait_ready(base, process)
            store("u2", second)  # written while the server holds the database open
            assert_private_and_sealed(db, [first, second], all_three=True)

            def send_as(user: str) -> str:
                response = httpx.post(f"{base}/projects/p1/tools", timeout=10,
                                      headers={"Authorization": f"Bearer {user_token(rsa_key, user)}"},
                                      json={"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
                                            "parameters": funnel_parameters(eventTime=None)})  # fmt: skip
                assert response.status_code == 200, response.text
                return str(fake.received[-1].json()["access_token"])

            assert (send_as("u1"), send_as("u2")) == (first, second)

            # Rotation, the server still running: a new key first in its file, every token
            # re-encrypted, and the server follows without a restart.
            added = funnelgate("credentials", "new-key", "--config", str(config))
            assert added.returncode == 0, added.stderr
            new_id = _found(r"added secret key ([0-9a-f]{16}) first", added.stdout)
            rotated = funnelgate("credentials", "rotate-key", "--config", str(config))
            assert rotated.returncode == 0, rotated.stderr
            assert (
                f"re-encrypted 2 access token(s) with secret key {new_id}; keys in use: {new_id}."
                in rotated.stdout
            )
            listed = funnelgate("credentials", "list", "--config", str(config)).stdout
            assert [row["KEY"] for row in table_rows(listed)] == [new_id] * 2
            assert (send_as("u1"), send_as("u2")) == (first, second)
            assert_private_and_sealed(db, [first, second], all_three=True)
        finally:
            process.terminate()
            process.wait(timeout=10)

    printed = log.read_text()
    key_lines = [line for line in key_file.read_text().splitlines() if not line.startswith("#")]
    for secret in [first, second, *key_lines]:
        assert secret not in printed + added.stdout + rotated.stdout
    assert_private_and_sealed(db, [first, second], all_three=False)

    # The old key can go: with only the new one, start-up's check opens every stored token.
    key_file.write_text("\n".join(line for line in key_lines if line not in old_key_lines) + "\n")
    assert funnelgate("credentials", "rotate-key", "--config", str(config)).returncode == 0


def test_serve_refuses_to_start_without_the_key_that_sealed_the_tokens(project_dir: Path):
    config = project_dir / "funnelgate.toml"
    assert funnelgate("credentials", "set", "--config", str(config), "--project", "p1", "--user", "u1",
                      "--access-token-file", "-", stdin="EAAB-sealed").returncode == 0  # fmt: skip
    listed = funnelgate("credentials", "list", "--config", str(config)).stdout
    [sealed_by] = [row["KEY"] for row in table_rows(listed)]
    wrong_key = new_secret_key()

    wrong = funnelgate("serve", "--config", str(config), "--port", str(free_port()),
                       env=clean_env(FUNNELGATE_SECRET_KEY=wrong_key))  # fmt: skip
    config.write_text(config.read_text().replace('secret_key_file = "secret.key"\n', ""))
    missing = funnelgate("serve", "--config", str(config), "--port", str(free_port()))
    for result, expected in [
        (wrong, f"stored access tokens use secret key {sealed_by}, which is not configured"),
        (missing, "the database holds encrypted access tokens but no secret key is configured"),
    ]:
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert expected in line and "FUNNELGATE_SECRET_KEY" in line, line
        assert wrong_key not in line and "EAAB" not in line


def test_a_0_1_database_with_plain_text_tokens_needs_a_key_then_is_encrypted(project_dir: Path):
    import sqlite3

    config, db = project_dir / "funnelgate.toml", project_dir / "funnelgate.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE credentials (project_id TEXT NOT NULL, user_id TEXT NOT NULL, "
                 "access_token TEXT NOT NULL, updated_at INTEGER NOT NULL, "
                 "PRIMARY KEY (project_id, user_id))")  # fmt: skip
    conn.execute("INSERT INTO credentials VALUES ('p1', 'u1', 'EAAB-from-0.1', 1700000000)")
    conn.close()
    with_key = config.read_text()
    config.write_text(with_key.replace('secret_key_file = "secret.key"\n', ""))
    refused = funnelgate("serve", "--config", str(config), "--port", str(free_port()))
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "1 access token(s) in plain text, written by funnelgate 0.1" in line

    config.write_text(with_key)
    listed = funnelgate("credentials", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    [migrated] = table_rows(listed.stdout)  # the user's one token: now its default credential
    assert uuid.UUID(migrated.pop("ID")).version == 4
    assert migrated.pop("UPDATED").startswith("2023-11-14T22:13:20")
    assert migrated.pop("KEY") != "-"
    assert migrated == {"PROJECT": "p1", "USER": "u1", "EXTERNAL_ID": "-", "LABEL": "-",
                        "DEFAULT": "true", "STATUS": "valid", "REFUSED": "-", "LAST_USED": "-"}  # fmt: skip
    assert_private_and_sealed(db, ["EAAB-from-0.1"], all_three=False)


def test_the_app_leaves_the_collector_alone(config):
    """gc.freeze() is a process-wide choice: the `serve` command's, never the app's."""
    import gc

    from starlette.testclient import TestClient

    from server.app import create_app

    gc.unfreeze()
    with TestClient(create_app(config)):
        assert gc.get_freeze_count() == 0


def table_rows(listed: str) -> list[dict[str, str]]:
    """`credentials list`'s rows, each by its header's names."""
    header, *lines = [line.split("\t") for line in listed.splitlines()]
    return [dict(zip(header, line, strict=True)) for line in lines]


def _found(pattern: str, text: str, flags: int = 0) -> str:
    match = re.search(pattern, text, flags)
    assert match is not None, pattern
    return match.group(1)
