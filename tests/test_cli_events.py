"""`funnelgate events list|replay|stats` and the held events of `credentials set|remove`, on
each backend (a SQLite file, then PostgreSQL) whose outbox rows are written with the outbox's
own statements."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server import cli
from server.cli import main, parse_since
from server.config import load_config
from server.durations import human_age
from server.storage import outbox
from server.storage.credentials import Credential, mark_invalid, open_credentials
from server.storage.crypto import add_secret_key
from server.storage.database import Connection, connect_sync
from server.storage.schema import upgrade_schema
from server.storage.writer import connect
from tests.support import public_pem

PIXEL_A = "111111111111111"
PIXEL_B = "222222222222222"
# Customer data as the outbox holds it (hashed) and a marker in the event body: neither may
# ever reach the CLI's output.
HASHED_EMAIL = hashlib.sha256(b"jane.doe@example.com").hexdigest()
MARKER = "body-marker-7c1e"
REJECTED = {
    "code": "UPSTREAM_REJECTED",
    "message": "Meta rejected the event.",
    "upstream": {"code": 100, "message": "Invalid parameter"},
}
REFUSED = {"code": "CREDENTIAL_REFUSED", "message": "Meta refused the access token."}


SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@pytest.fixture
def config_path(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, backend: str | None) -> Path:
    """p1 has no project-wide token (a user's own credential or nothing); p2 has one."""
    (tmp_path / "project.pub.pem").write_text(public_pem(rsa_key))
    add_secret_key(tmp_path / "secret.key")
    path = tmp_path / "funnelgate.toml"
    url = "" if backend is None else f"url = {json.dumps(backend)}\n"
    path.write_text(
        f'[storage]\nsecret_key_file = "secret.key"\n{url}'
        '[[projects]]\nid = "p1"\njwt_public_key_file = "project.pub.pem"\n'
        '[[projects]]\nid = "p2"\njwt_public_key_file = "project.pub.pem"\n'
        'facebook_access_token = "EAAB-project-token"\n'
    )
    config = load_config(path, {})
    open_credentials(config.storage).close()  # the database `serve` creates at start-up
    return path


@pytest.fixture
def db(config_path: Path) -> Iterator[Connection]:
    """A connection of its own to the server's database (the schema is in place)."""
    storage = load_config(config_path, {}).storage
    upgrade_schema(storage)
    with closing(connect_sync(storage.database_path, storage.url)) as connection:
        yield connection


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def add(
    db: Connection,
    count: int = 1,
    *,
    project: str = "p1",
    user: str = "u1",
    pixel: str = PIXEL_A,
    name: str = "Purchase",
    prefix: str = "evt",
    at: float | None = None,
    credential: str | None = None,
) -> list[int]:
    """`count` queued events accepted at `at` for `credential` (None: the project's token), in
    one transaction."""
    now = time.time() if at is None else at
    events = []
    for i in range(count):
        event = {
            "event_name": name,
            "event_time": int(time.time()),
            "event_id": f"{prefix}-{i}" if count > 1 else prefix,
            "action_source": "website",
            "user_data": {"em": [HASHED_EMAIL]},
            "custom_data": {"order_id": MARKER, "value": 12.5, "currency": "EUR"},
        }
        events.append(
            outbox.NewEvent(project, user, credential, pixel, None, event, orjson.dumps(event))
        )
    db.execute("BEGIN IMMEDIATE")
    seqs = list(outbox.insert(db, outbox.rows_of(events, now=now, next_at=now)))
    db.execute("COMMIT")
    return seqs


def rows(db: Connection) -> list[tuple[Any, ...]]:
    return list(db.execute("SELECT * FROM outbox ORDER BY seq").fetchall())


def row(db: Connection, seq: int) -> dict[str, Any]:
    cursor = db.execute("SELECT * FROM outbox WHERE seq = ?", (seq,))
    names = [d[0] for d in cursor.description]
    return dict(zip(names, cursor.fetchone(), strict=True))


@pytest.fixture
def mixed(db: Connection) -> dict[str, int]:
    """One event in each state, in two projects and on two pixels."""
    queued = add(db, prefix="evt-queued")[0]
    delivered = add(db, prefix="evt-delivered", pixel=PIXEL_B)[0]
    outbox.mark_delivered(db, [delivered], now=time.time(), fbtrace_id="TraceX")
    failed = add(db, prefix="evt-failed", name="Lead")[0]
    outbox.mark_failed(db, [failed], now=time.time(), error=REJECTED)
    held = add(db, prefix="evt-held", project="p2", user="u9")[0]
    outbox.mark_held(db, [held], now=time.time(), error=REFUSED)
    return {"queued": queued, "delivered": delivered, "failed": failed, "held": held}


def test_list_shows_a_table_newest_first(capsys, config_path: Path, mixed):
    code, out, err = run(capsys, "events", "list", "--config", str(config_path))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "UPDATED", "PROJECT", "USER", "EVENT_ID", "EVENT", "PIXEL", "STATUS", "ATTEMPTS", "ERROR"
    ]  # fmt: skip
    cells = [line.split() for line in lines[1:]]
    assert [c[3] for c in cells] == ["evt-held", "evt-failed", "evt-delivered", "evt-queued"]
    assert cells[0][1:3] == ["p2", "u9"] and cells[0][6:] == ["held", "1", "CREDENTIAL_REFUSED"]
    assert cells[1][4:] == ["Lead", PIXEL_A, "failed", "1", "UPSTREAM_REJECTED"]
    assert cells[2][5:] == [PIXEL_B, "delivered", "1"]
    assert cells[3][6:] == ["queued", "0"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cells[0][0])
    assert err == ""


def test_list_filters_by_project_status_since_and_limit(capsys, config_path: Path, db, mixed):
    config = str(config_path)
    code, out, _ = run(capsys, "events", "list", "--config", config, "--project", "p2")
    assert code == 0 and [line.split()[3] for line in out.splitlines()[1:]] == ["evt-held"]
    code, out, _ = run(capsys, "events", "list", "--config", config, "--status", "failed")
    assert code == 0 and [line.split()[3] for line in out.splitlines()[1:]] == ["evt-failed"]
    code, out, _ = run(capsys, "events", "list", "--config", config, "--status", "held")
    assert code == 0 and [line.split()[3] for line in out.splitlines()[1:]] == ["evt-held"]

    add(db, prefix="evt-old", at=time.time() - 3 * 3600)
    code, out, _ = run(capsys, "events", "list", "--config", config, "--since", "2h")
    assert code == 0 and "evt-old" not in out and len(out.splitlines()) == 5
    code, out, _ = run(capsys, "events", "list", "--config", config, "--since", "1d")
    assert code == 0 and "evt-old" in out and len(out.splitlines()) == 6
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 2 * 3600))
    code, out, _ = run(capsys, "events", "list", "--config", config, "--since", since)
    assert code == 0 and "evt-old" not in out and len(out.splitlines()) == 5

    code, out, err = run(capsys, "events", "list", "--config", config, "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 3
    assert "the newest 2" in err


def test_list_json_is_one_public_status_a_line(capsys, config_path: Path, mixed):
    code, out, _ = run(capsys, "events", "list", "--config", str(config_path), "--json")
    assert code == 0
    listed = {item["event_id"]: item for item in map(json.loads, out.splitlines())}
    assert set(listed) == {"evt-held", "evt-failed", "evt-delivered", "evt-queued"}
    held = listed["evt-held"]
    assert held["project_id"] == "p2" and held["user_id"] == "u9"
    assert held["status"] == "queued" and held["held"] is True
    assert held["error"] == REFUSED
    assert listed["evt-failed"]["error"] == REJECTED
    assert listed["evt-delivered"]["fbtrace_id"] == "TraceX"
    assert "error" not in listed["evt-delivered"]
    assert set(listed["evt-queued"]) == {
        "project_id", "user_id", "event_id", "event_name", "pixel_id", "status", "attempts",
        "accepted_at", "updated_at",
    }  # fmt: skip


def test_a_callers_id_cannot_drive_the_terminal(capsys, config_path: Path, db):
    add(db, prefix="evt\x1b[2J\x07" + "x" * 100)
    code, out, _ = run(capsys, "events", "list", "--config", str(config_path))
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "evt?[2J?" in out and "…" in out  # cut at the column's width
    code, out, _ = run(capsys, "events", "list", "--config", str(config_path), "--json")
    assert json.loads(out)["event_id"] == "evt\x1b[2J\x07" + "x" * 100  # whole, and escaped
    assert "\x1b" not in out


def test_no_customer_data_or_token_is_ever_printed(capsys, config_path: Path, db, mixed):
    failed = add(db, 3, prefix="evt-f")
    outbox.mark_failed(db, failed, now=time.time(), error=REJECTED)
    credential = stored(config_path, token="EAAB-user-old-token")
    held(db, 2, prefix="evt-h", credential=credential.id)
    (config_path.parent / "token.txt").write_text("EAAB-user-secret-token")
    config = str(config_path)
    outputs = []
    for args in (
        ("events", "list", "--config", config),
        ("events", "list", "--config", config, "--json", "--status", "failed"),
        ("events", "stats", "--config", config),
        ("events", "stats", "--config", config, "--json"),
        ("events", "replay", "--config", config, "--all-failed", "--dry-run"),
        ("events", "replay", "--config", config, "--event-id", "evt-f-0", "--project", "p1"),
        ("events", "replay", "--config", config, "--all-failed"),
        ("credentials", "set", "--config", config, "--project", "p1", "--user", "u1",
         "--credential-id", credential.id,
         "--access-token-file", str(config_path.parent / "token.txt")),
        ("credentials", "list", "--config", config),
        ("credentials", "list", "--config", config, "--json"),
        ("credentials", "remove", "--config", config, "--project", "p1", "--user", "u1"),
    ):  # fmt: skip
        code, out, err = run(capsys, *args)
        assert code == 0, (args, err)
        outputs.append(out + err)
    printed = "\n".join(outputs)
    assert "evt-f-1" in printed and "2 held event(s) resumed" in printed  # the commands spoke
    for secret in (MARKER, HASHED_EMAIL, HASHED_EMAIL[:16], "EAAB", "order_id", "user_data"):
        assert secret not in printed


def test_stats_counts_by_status_and_pixel_with_the_oldest_pending_age(capsys, config_path, db):
    add(db, 2, at=time.time() - 192)  # queued on A, accepted 3m 12s ago
    outbox.mark_failed(db, add(db, prefix="f"), now=time.time(), error=REJECTED)
    delivered = add(db, 3, pixel=PIXEL_B, prefix="d")
    outbox.mark_delivered(db, delivered, now=time.time(), fbtrace_id=None)
    outbox.mark_held(db, add(db, pixel=PIXEL_B, prefix="h", at=time.time() - 60), now=time.time(),
                     error=REFUSED)  # fmt: skip
    add(db, project="p2", prefix="other", at=time.time() - 7200)

    code, out, _ = run(capsys, "events", "stats", "--config", str(config_path), "--project", "p1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "2 queued, 1 held, 3 delivered, 1 failed"
    assert re.fullmatch(r"oldest pending: 3m 1[23]s \(accepted \S+Z\)", lines[1]), lines[1]
    assert lines[2].split() == ["PIXEL", "QUEUED", "HELD", "DELIVERED", "FAILED", "OLDEST",
                                "PENDING"]  # fmt: skip
    assert lines[3].split()[:5] == [PIXEL_A, "2", "0", "0", "1"]
    assert lines[3].split()[5:7] in (["3m", "12s"], ["3m", "13s"])
    assert lines[4].split()[:5] == [PIXEL_B, "0", "1", "3", "0"]
    assert lines[4].split()[5:7] in (["1m", "0s"], ["1m", "1s"])

    code, out, _ = run(capsys, "events", "stats", "--config", str(config_path), "--json")
    body = json.loads(out)
    assert code == 0
    assert body["by_status"] == {"queued": 3, "held": 1, "delivered": 3, "failed": 1}
    assert 7199 <= body["oldest_pending_seconds"] <= 7202  # p2's event counts without --project
    assert body["pixels"][PIXEL_B]["held"] == 1
    assert 59 <= body["pixels"][PIXEL_B]["oldest_pending_seconds"] <= 62
    assert body["pixels"][PIXEL_B]["oldest_pending_at"].endswith("Z")


def test_stats_of_an_empty_outbox(capsys, config_path: Path, db):
    code, out, _ = run(capsys, "events", "stats", "--config", str(config_path))
    assert code == 0
    assert out.splitlines() == ["0 queued, 0 held, 0 delivered, 0 failed", "oldest pending: none"]


def test_replay_by_id_keeps_the_event_id_and_names_what_it_could_not_replay(
    capsys, config_path: Path, db, mixed
):
    # evt-again failed once, then the caller sent it again and that newer row was delivered:
    # the failed one is superseded and stays as it is.
    again = add(db, prefix="evt-again")
    outbox.mark_failed(db, again, now=time.time(), error=REJECTED)
    newer = add(db, prefix="evt-again")
    outbox.mark_delivered(db, newer, now=time.time(), fbtrace_id="T2")
    before = row(db, mixed["failed"])

    code, out, err = run(capsys, "events", "replay", "--config", str(config_path), "--event-id",
                         "evt-failed", "evt-delivered", "evt-unknown", "evt-again", "evt-failed")  # fmt: skip
    assert code == 1  # not everything asked for was replayed
    assert out.splitlines()[0].startswith("replayed 1 failed event(s), same event_id")
    assert "UPSTREAM_REJECTED 1" in out
    assert err.splitlines() == [
        "funnelgate: evt-delivered: not failed (delivered)",
        "funnelgate: evt-unknown: not found",
        "funnelgate: evt-again: not failed (delivered)",
    ]
    after = row(db, mixed["failed"])
    assert after["status"] == "queued" and after["event_id"] == before["event_id"] == "evt-failed"
    assert after["event"] == before["event"] and after["attempts"] == 0 and after["error"] is None
    assert after["next_at"] <= time.time()  # due now: the dispatcher picks it up
    assert row(db, again[0])["status"] == "failed"
    assert len(rows(db)) == 6  # requeued in place, no new row

    code, out, err = run(capsys, "events", "replay", "--config", str(config_path), "--event-id", "evt-failed")  # fmt: skip
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "funnelgate: evt-failed: not failed (queued)",
        "funnelgate: no failed events matched",
    ]


def test_replay_by_id_stays_in_the_project_asked_for(capsys, config_path: Path, db):
    for project in ("p1", "p2"):
        outbox.mark_failed(db, add(db, project=project, prefix="shared"), now=time.time(),
                           error=REJECTED)  # fmt: skip
    code, _, err = run(capsys, "events", "replay", "--config", str(config_path), "--project", "p2",
                       "--event-id", "shared")  # fmt: skip
    assert code == 0, err
    states = db.execute("SELECT project_id, status FROM outbox ORDER BY project_id").fetchall()
    assert states == [("p1", "failed"), ("p2", "queued")]


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement the CLI's connections run, in order."""
    ran: list[str] = []

    def traced(path: Path, url: str | None) -> sqlite3.Connection:
        connection = connect(path)
        connection.set_trace_callback(ran.append)
        return connection

    monkeypatch.setattr(cli, "connect_sync", traced)
    return ran


@SQLITE_ONLY  # the statements are traced on SQLite's connection
def test_replay_all_failed_commits_in_batches_of_at_most_1000(
    capsys, config_path: Path, db, statements
):
    failed = add(db, 2500, prefix="bulk")
    outbox.mark_failed(db, failed, now=time.time(), error=REJECTED)
    outbox.mark_failed(db, add(db, project="p2", prefix="p2-bulk"), now=time.time(), error=REJECTED)
    delivered = add(db, 10, prefix="ok")
    outbox.mark_delivered(db, delivered, now=time.time(), fbtrace_id=None)
    ids_before = db.execute("SELECT seq, event_id, event FROM outbox ORDER BY seq").fetchall()

    code, out, err = run(capsys, "events", "replay", "--config", str(config_path), "--all-failed",
                         "--project", "p1")  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[0].startswith("replayed 2,500 failed event(s)")
    assert "… and 2,480 more" in out
    transactions = [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")]
    assert transactions == ["BEGIN IMMEDIATE", "COMMIT"] * 3  # 1,000 + 1,000 + 500
    updates = [s for s in statements if s.startswith("UPDATE outbox SET status = 'queued'")]
    assert len(updates) == 2500

    assert (
        db.execute("SELECT seq, event_id, event FROM outbox ORDER BY seq").fetchall() == ids_before
    )
    counts = dict(db.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())
    assert counts == {"queued": 2500, "delivered": 10, "failed": 1}  # p2's was not asked for


@SQLITE_ONLY
def test_replay_by_many_ids_commits_in_batches(capsys, config_path: Path, db, statements):
    failed = add(db, 1500, prefix="many")
    outbox.mark_failed(db, failed, now=time.time(), error=REJECTED)
    ids = [f"many-{i}" for i in range(1500)]
    code, out, err = run(capsys, "events", "replay", "--config", str(config_path), "--project", "p1",
                         "--event-id", *ids)  # fmt: skip
    assert code == 0, err
    assert out.startswith("replayed 1,500 failed event(s)")
    assert statements.count("BEGIN IMMEDIATE") == statements.count("COMMIT") == 2
    assert db.execute("SELECT count(*) FROM outbox WHERE status = 'queued'").fetchone()[0] == 1500


def test_replay_dry_run_changes_nothing(capsys, config_path: Path, db, mixed):
    failed = add(db, 1200, prefix="dry")
    outbox.mark_failed(db, failed, now=time.time(), error=REJECTED)
    before = rows(db)
    code, out, err = run(capsys, "events", "replay", "--config", str(config_path), "--all-failed",
                         "--dry-run")  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "would replay 1,201 failed event(s), same event_id"
    assert lines[1] == "by error: UPSTREAM_REJECTED 1,201"
    assert lines[2].split() == ["PROJECT", "EVENT_ID", "EVENT", "PIXEL", "ERROR"]
    assert lines[3].split() == ["p1", "evt-failed", "Lead", PIXEL_A, "UPSTREAM_REJECTED"]
    assert lines[-1] == "… and 1,181 more"
    code, out, err = run(capsys, "events", "replay", "--config", str(config_path), "--dry-run",
                         "--event-id", "evt-failed", "evt-queued")  # fmt: skip
    assert code == 1
    assert out.startswith("would replay 1 failed event(s)")
    assert err == "funnelgate: evt-queued: not failed (queued)\n"
    assert rows(db) == before


def stored(
    config_path: Path, project: str = "p1", user: str = "u1", token: str = "EAAB-x", **options: Any
) -> Credential:
    """A credential as `credentials set` stores it (options: CredentialStore.set's)."""
    with closing(open_credentials(load_config(config_path, {}).storage)) as store:
        return store.set(project, user, token, **options)[0]


def held(db: Connection, count: int = 1, **options: Any) -> list[int]:
    """`count` events Meta refused the credential of (options: add's)."""
    seqs = add(db, count, **options)
    outbox.mark_held(db, seqs, now=time.time() - 60, error=REFUSED)
    return seqs


def statuses(db: Connection, seqs: list[int]) -> list[str]:
    return [row(db, seq)["status"] for seq in seqs]


def test_credentials_set_resumes_that_credentials_held_events(capsys, config_path: Path, db):
    mine = stored(config_path)
    other = stored(config_path, token="EAAB-y")  # the same user's second account
    theirs = stored(config_path, user="u2")
    resumed = held(db, 3, prefix="mine", credential=mine.id)
    untouched = [
        *held(db, prefix="other", credential=other.id),
        *held(db, user="u2", prefix="theirs", credential=theirs.id),
        *held(db, prefix="project"),  # for the project's token
    ]
    (config_path.parent / "token.txt").write_text("EAAB-new-token\n")
    code, out, err = run(capsys, "credentials", "set", "--config", str(config_path), "--project",
                         "p1", "--user", "u1", "--credential-id", mine.id, "--access-token-file",
                         str(config_path.parent / "token.txt"))  # fmt: skip
    assert code == 0, err
    assert out == (
        f"replaced the access token of credential {mine.id} (user 'u1', project 'p1', default; "
        "encrypted); 3 held event(s) resumed\n"
    )
    for seq in resumed:
        assert row(db, seq)["status"] == "queued" and row(db, seq)["next_at"] <= time.time()
    assert statuses(db, untouched) == ["held"] * 3

    code, out, _ = run(capsys, "credentials", "set", "--config", str(config_path), "--project",
                       "p1", "--user", "u1", "--credential-id", mine.id, "--access-token-file",
                       str(config_path.parent / "token.txt"))  # fmt: skip
    assert code == 0 and out.endswith("; no held events resumed\n")


def test_credentials_set_naming_no_credential_renews_the_users_default(
    capsys, config_path: Path, db
):
    """As before credentials had ids: `set --user U` is U's token (its default credential),
    so a refused token is renewed and its held events resume; `--new` adds another."""
    default = stored(config_path)
    resumed = held(db, 2, prefix="renewed", credential=default.id)
    (config_path.parent / "token.txt").write_text("EAAB-renewed\n")
    args = ("credentials", "set", "--config", str(config_path), "--project", "p1", "--user",
            "u1", "--access-token-file", str(config_path.parent / "token.txt"))  # fmt: skip
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert out.startswith(f"replaced the access token of credential {default.id} ")
    assert out.endswith("; 2 held event(s) resumed\n")
    assert statuses(db, resumed) == ["queued"] * 2
    code, out, _ = run(capsys, *args, "--new")
    assert code == 0 and out.startswith("stored the access token of credential ")
    assert default.id not in out


def test_credentials_set_on_the_same_credential_replaces_its_token_and_makes_it_valid(
    capsys, config_path: Path, db
):
    """Named by id or by external id: the same credential (id, label, default kept), the new
    token, `valid` again, and only its own held events resumed."""
    agency = stored(config_path, token="EAAB-agency-old", external_id="acct-a", label="Agency")
    brand = stored(config_path, token="EAAB-brand-old")
    refusal = {**REFUSED, "upstream": {"code": 190}}
    for credential in (agency, brand):
        mark_invalid(db, "p1", credential.id, refusal)
    agency_events = held(db, 2, prefix="agency", credential=agency.id)
    brand_events = held(db, prefix="brand", credential=brand.id)
    config = str(config_path)

    code, out, err = run(capsys, "credentials", "set", "--config", config, "--project", "p1",
                         "--user", "u1", "--external-id", "acct-a", "--access-token-file",
                         token_file(config_path, "EAAB-agency-new"))  # fmt: skip
    assert code == 0, err
    assert out == (
        f"replaced the access token of credential {agency.id} (user 'u1', project 'p1', "
        "default; encrypted); 2 held event(s) resumed\n"
    )
    assert statuses(db, agency_events + brand_events) == ["queued", "queued", "held"]
    now = current(config_path, agency.id, brand.id)
    assert now[agency.id] == ("EAAB-agency-new", "valid", None, "acct-a", "Agency", True)
    assert now[brand.id] == ("EAAB-brand-old", "invalid", refusal, None, None, False)

    code, out, err = run(capsys, "credentials", "set", "--config", config, "--project", "p1",
                         "--user", "u1", "--credential-id", brand.id.upper(),
                         "--access-token-file", token_file(config_path, "EAAB-brand-new"))  # fmt: skip
    assert code == 0, err
    assert out == (
        f"replaced the access token of credential {brand.id} (user 'u1', project 'p1'; "
        "encrypted); 1 held event(s) resumed\n"
    )
    assert statuses(db, brand_events) == ["queued"]
    assert current(config_path, brand.id)[brand.id][:3] == ("EAAB-brand-new", "valid", None)
    assert db.execute("SELECT count(*) FROM credentials").fetchone()[0] == 2


def test_credentials_set_never_takes_another_users_credential(capsys, config_path: Path, db):
    theirs = stored(config_path, user="u2", token="EAAB-theirs")
    code, out, err = run(capsys, "credentials", "set", "--config", str(config_path), "--project",
                         "p1", "--user", "u1", "--credential-id", theirs.id,
                         "--access-token-file", token_file(config_path, "EAAB-mine"))  # fmt: skip
    assert (code, out) == (2, "")
    assert err == f"funnelgate: credential {theirs.id} belongs to another user\n"
    assert current(config_path, theirs.id)[theirs.id][:2] == ("EAAB-theirs", "valid")


def token_file(config_path: Path, token: str) -> str:
    path = config_path.parent / "token.txt"
    path.write_text(token + "\n")
    return str(path)


def current(config_path: Path, *ids: str) -> dict[str, tuple[Any, ...]]:
    """Each credential's token, status, refusal, external id, label and default flag."""
    with closing(open_credentials(load_config(config_path, {}).storage)) as store:
        found = {i: store.by_id("p1", i) for i in ids}
        return {
            i: (store.open("p1", c), c.status, c.status_error, c.external_id, c.label, c.default)
            for i, c in found.items()
            if c is not None
        }


def test_credentials_set_resumes_more_held_events_than_one_batch(capsys, config_path: Path, db):
    credential = stored(config_path)
    held(db, 2100, prefix="lots", credential=credential.id)
    (config_path.parent / "token.txt").write_text("EAAB-new-token\n")
    code, out, _ = run(capsys, "credentials", "set", "--config", str(config_path), "--project",
                       "p1", "--user", "u1", "--credential-id", credential.id,
                       "--access-token-file", str(config_path.parent / "token.txt"))  # fmt: skip
    assert code == 0 and out.endswith("; 2,100 held event(s) resumed\n")
    assert db.execute("SELECT count(*) FROM outbox WHERE status = 'held'").fetchone()[0] == 0


def test_credentials_remove_fails_that_credentials_held_events(capsys, config_path: Path, db):
    credential = stored(config_path)
    failed = held(db, 2, prefix="held", credential=credential.id)
    other = held(db, user="u2", prefix="other", credential=stored(config_path, user="u2").id)
    code, out, err = run(capsys, "credentials", "remove", "--config", str(config_path),
                         "--project", "p1", "--user", "u1")  # fmt: skip
    assert code == 0, err
    assert out == (
        f"removed credential {credential.id} of user 'u1'; 2 held event(s) failed "
        "(INTEGRATION_NOT_ENABLED)\n"
    )
    for seq in failed:
        assert row(db, seq)["status"] == "failed"
        assert orjson.loads(row(db, seq)["error"]) == {
            "code": "INTEGRATION_NOT_ENABLED",
            "message": "The credential was removed.",
        }
    assert statuses(db, other) == ["held"]
    # listed as failed: replayable once a credential of the same id is set again
    code, out, _ = run(capsys, "events", "list", "--config", str(config_path), "--status", "failed")
    assert code == 0 and out.count("INTEGRATION_NOT_ENABLED") == 2


def test_credentials_remove_fails_held_events_even_in_a_project_with_its_own_token(
    capsys, config_path: Path, db
):
    """p2 has a project-wide token, yet an event accepted for a user's credential is never sent
    with another token: it remembers its credential, which is gone."""
    credential = stored(config_path, project="p2")
    mine = held(db, project="p2", prefix="held", credential=credential.id)
    project_token = held(db, project="p2", prefix="project")
    code, out, _ = run(capsys, "credentials", "remove", "--config", str(config_path),
                       "--project", "p2", "--user", "u1")  # fmt: skip
    assert code == 0
    assert out.endswith("; 1 held event(s) failed (INTEGRATION_NOT_ENABLED)\n")
    assert statuses(db, mine) == ["failed"]
    assert statuses(db, project_token) == ["held"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("list", "--since", "yesterday"), "--since 'yesterday': use a duration"),
        (("list", "--since", "0m"), "the duration must be more than 0"),
        (("list", "--since", "99999999d"), "--since '99999999d': use a duration"),
        (("list", "--status", "lost"), "--status must be one of queued, held, delivered, failed"),
        (("list", "--limit", "0"), "--limit must be a whole number from 1 to 10,000"),
        (("list", "--limit", "10001"), "--limit must be a whole number from 1 to 10,000"),
        (("list", "--limit", "many"), "--limit must be a whole number from 1 to 10,000"),
        (("list", "--project", "nope"), "project 'nope' is not in the config"),
        (("stats", "--project", "nope"), "project 'nope' is not in the config"),
        (("replay", "--all-failed", "--project", "nope"), "project 'nope' is not in the config"),
        (("replay", "--all-failed", "--project", ""), "project '' is not in the config"),
        (("list",), "no events matched"),
        (("list", "--status", "failed", "--json"), "no events matched"),
        (("replay", "--all-failed"), "no failed events matched"),
        (("replay", "--all-failed", "--dry-run"), "no failed events matched"),
    ],
)
def test_bad_options_and_empty_results_are_one_line_and_fail(
    capsys, config_path: Path, db, args, message
):
    code, out, err = run(capsys, "events", args[0], "--config", str(config_path), *args[1:])
    assert code != 0
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("funnelgate: ") and message in line


@SQLITE_ONLY  # a file that is not there
def test_a_config_that_is_not_the_servers_is_one_line(capsys, tmp_path: Path, config_path: Path):
    config = config_path.read_text().replace("[storage]\n", '[storage]\nurl = "sqlite:///x.db"\n')
    (tmp_path / "other.toml").write_text(config)
    code, out, err = run(capsys, "events", "stats", "--config", str(tmp_path / "other.toml"))
    assert (code, out) == (2, "")
    assert (
        err
        == f"funnelgate: no database at {tmp_path / 'x.db'}: is this the config the server runs with?\n"
    )
    assert not (tmp_path / "x.db").exists()


@SQLITE_ONLY  # SQLite's write lock
def test_a_locked_database_is_one_line(capsys, config_path: Path, db, monkeypatch):
    outbox.mark_failed(db, add(db), now=time.time(), error=REJECTED)
    monkeypatch.setattr(cli, "CLI_BUSY_TIMEOUT_MS", 50)  # the CLI's wait for the lock
    db.execute("BEGIN IMMEDIATE")  # the server's writer, mid-commit, for longer than the wait
    try:
        code, out, err = run(
            capsys, "events", "replay", "--config", str(config_path), "--all-failed"
        )
    finally:
        db.execute("ROLLBACK")
    assert (code, out) == (1, "")
    assert err == "funnelgate: storage: database is locked\n"
    assert db.execute("SELECT status FROM outbox").fetchone() == ("failed",)


def test_parse_since():
    now = 1_800_000_000.0
    assert parse_since("30m", now) == now - 1800
    assert parse_since("1h", now) == now - 3600
    assert parse_since("2d", now) == now - 2 * 86400
    assert parse_since("1w", now) == now - 7 * 86400
    assert parse_since("2024-01-01T00:00:00Z", now) == 1_704_067_200.0
    assert parse_since("2024-01-01T00:00:00", now) == 1_704_067_200.0  # UTC when it says nothing
    assert parse_since("2024-01-01T01:00:00+01:00", now) == 1_704_067_200.0


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (45.9, "45s"),
        (192, "3m 12s"),
        (3600, "1h 0m"),
        (2 * 86400 + 4 * 3600 + 5, "2d 4h"),
    ],
)
def test_human_age(seconds: float, shown: str):
    assert human_age(seconds) == shown


def test_a_long_replay_on_a_terminal_shows_progress(capsys, config_path: Path, db, monkeypatch):
    failed = add(db, 1500, prefix="tty")
    outbox.mark_failed(db, failed, now=time.time(), error=REJECTED)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run(capsys, "events", "replay", "--config", str(config_path), "--all-failed")
    assert code == 0
    assert out.startswith("replayed 1,500 failed event(s)")
    assert "replaying" in err and "100%" in err  # rich's bar, drawn on stderr
    assert db.execute("SELECT count(*) FROM outbox WHERE status = 'queued'").fetchone()[0] == 1500
