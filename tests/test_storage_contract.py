"""The storage contract: what the outbox, credentials, idempotency keys, per-minute counters
and the schema promise, run against both backends (the `backend` fixture: a SQLite file, then
a real PostgreSQL database). The storage is built as its users build it: the server's objects
as server/app.py's lifespan makes them, the CLI's connection and credential store as
server/cli.py opens them. The tests speak of behaviour only; the few promises only one backend
makes (SKIP LOCKED claims, NOTIFY, concurrent migrations) are the PostgreSQL-only tests at the
end, on `postgres_url`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import orjson
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import Config, StorageSettings
from server.console import queries
from server.errors import ConfigError, StorageUnavailable
from server.storage import credentials as credentials_module
from server.storage import idempotency, minutes, outbox, postgres, schema_pg
from server.storage.credentials import (
    Credentials,
    CredentialStore,
    keyring_of,
    mark_invalid,
    open_credentials,
    write_uses,
)
from server.storage.crypto import SecretKeyError, new_secret_key, parse_secret_keys
from server.storage.database import Connection, connect_sync, open_database
from server.storage.outbox import EventStatus, NewEvent, Outbox
from server.storage.schema import upgrade_schema
from tests.support import NOW, PIXEL, PROJECT, free_port, make_config

T = TypeVar("T")
USER = "user-1"
OTHER_PIXEL = "222222222222222"
OTHER_PROJECT = "p2"
REJECTED = {"code": "UPSTREAM_REJECTED", "message": "Meta rejected the event."}
REFUSED = {"code": "CREDENTIAL_REFUSED", "message": "Meta refused the access token."}
LEASE = 30.0
TOKEN = "EAAB-project-token"


# --- the storage, as the server and the CLI open it ---------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, backend: str | None) -> Config:
    return make_config(tmp_path, rsa_key, database_url=backend, facebook_access_token=TOKEN)


@pytest.fixture
def storage(settings: Config) -> StorageSettings:
    return settings.storage


@pytest.fixture
def db(storage: StorageSettings) -> Iterator[Connection]:
    """The CLI's connection (server/cli.py's _outbox_db): its own, autocommit, the schema
    brought up to date first."""
    upgrade_schema(storage)
    with closing(connect_sync(storage.database_path, storage.url)) as connection:
        yield connection


@pytest.fixture
def store(storage: StorageSettings) -> Iterator[CredentialStore]:
    """The CLI's credential store."""
    with closing(open_credentials(storage)) as opened:
        yield opened


@dataclasses.dataclass
class Served:
    queue: Outbox
    credentials: Credentials


@asynccontextmanager
async def serving(storage: StorageSettings, clock: Callable[[], float]) -> AsyncIterator[Served]:
    """The server's storage objects, made as server/app.py's lifespan makes them."""
    open_credentials(storage).close()
    database = open_database(storage.database_path, storage.url)
    queue = Outbox(database, clock=clock)
    try:
        yield Served(queue, Credentials(database, keyring_of(storage)))
    finally:
        queue.close()


def served(storage: StorageSettings, body: Callable[[Served], Awaitable[T]]) -> T:
    async def go() -> T:
        async with serving(storage, Clock()) as server:
            return await body(server)

    return asyncio.run(go())


def event(n: int | str, *, name: str = "Purchase") -> dict[str, Any]:
    return {"event_name": name, "event_time": int(NOW) - 60, "action_source": "website",
            "event_id": f"e{n}", "user_data": {"external_id": ["0" * 64]}}  # fmt: skip


def new(
    n: int | str,
    *,
    project: str = PROJECT,
    user: str = USER,
    credential: str | None = None,
    pixel: str = PIXEL,
    test_code: str | None = None,
    name: str = "Purchase",
) -> NewEvent:
    e = event(n, name=name)
    return NewEvent(project, user, credential, pixel, test_code, e, orjson.dumps(e))


def add(
    db: Connection, *events: NewEvent, now: float = NOW, next_at: float | None = None
) -> list[int]:
    """Queued rows, in one transaction (as the CLI writes)."""
    rows = outbox.rows_of(events, now=now, next_at=now if next_at is None else next_at)
    db.execute("BEGIN IMMEDIATE")
    seqs = outbox.insert(db, rows)
    db.execute("COMMIT")
    return seqs


def get(db: Connection, seq: int) -> EventStatus:
    [found] = queries.by_seq(db, [seq])
    return found


def statuses(db: Connection, seqs: list[int]) -> list[str]:
    return [get(db, seq).status for seq in seqs]


def claimed(db: Connection, *, now: float, limit: int = 100) -> list[int]:
    return sorted(c.seq for c in outbox.claim(db, now=now, lease_until=now + LEASE, limit=limit))


def event_ids(db: Connection, seqs: list[int]) -> list[str]:
    return [get(db, seq).event_id for seq in seqs]


# --- the outbox: enqueue ----------------------------------------------------------------------


def test_enqueue_returns_each_rows_seq_in_order_and_the_row_as_given(storage, db):
    async def body(server: Served) -> list[int]:
        return await server.queue.enqueue(
            [new(1), new(2, credential="c-1", test_code="TEST9"), new(3, pixel=OTHER_PIXEL)]
        )

    seqs = served(storage, body)
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert event_ids(db, seqs) == ["e1", "e2", "e3"]
    second = get(db, seqs[1])
    assert (second.status, second.attempts, second.credential_id) == ("queued", 0, "c-1")
    assert (second.created_at, second.updated_at, second.next_at) == (NOW, NOW, NOW)
    stored = queries.stored(db, seqs[1])
    assert stored is not None and stored.test_event_code == "TEST9"
    assert stored.event == event(2)
    assert get(db, seqs[2]).pixel_id == OTHER_PIXEL


def test_concurrent_enqueues_share_one_commit_and_each_gets_its_own_seqs(storage, db, monkeypatch):
    async def body(server: Served) -> tuple[list[list[int]], int]:
        database = server.queue.database
        submitted = []
        real_submit = database.submit

        def counting(job: Callable[[Connection], Any]) -> asyncio.Future[Any]:
            submitted.append(job)
            return real_submit(job)

        monkeypatch.setattr(database, "submit", counting)
        gate = threading.Event()
        blocker = database.submit(lambda _: gate.wait(5))  # the writer is busy meanwhile
        calls = [server.queue.enqueue([new(f"{c}-{i}") for i in range(c + 1)]) for c in range(8)]
        waiting = asyncio.gather(*calls)
        await asyncio.sleep(0.05)  # every call has handed its rows over
        gate.set()
        await blocker
        return await waiting, len(submitted) - 1

    results, jobs = served(storage, body)
    assert jobs == 1  # eight calls, one statement and one commit
    assert [len(seqs) for seqs in results] == list(range(1, 9))
    every = [seq for seqs in results for seq in seqs]
    assert len(set(every)) == len(every) == 36
    for c, seqs in enumerate(results):
        assert event_ids(db, seqs) == [f"e{c}-{i}" for i in range(c + 1)]


# --- the outbox: claims, leases, settling ------------------------------------------------


def test_a_claim_takes_due_rows_oldest_first_and_leases_them(db):
    late, early, middle = add(db, new(1), next_at=NOW - 10), add(db, new(2), next_at=NOW - 30), \
        add(db, new(3), next_at=NOW - 20)  # fmt: skip
    future = add(db, new(4), next_at=NOW + 60)
    held = add(db, new(5))
    outbox.mark_held(db, held, now=NOW, error=REFUSED)

    assert claimed(db, now=NOW, limit=2) == sorted(early + middle)  # the two due longest
    assert claimed(db, now=NOW + 1) == late  # the leased ones are not due again
    assert claimed(db, now=NOW + 2) == []
    assert get(db, early[0]).next_at == NOW + LEASE  # the lease is the row's next_at
    # the leases run out: due again (a sender that died), with the row that came due meanwhile
    assert claimed(db, now=NOW + 61) == sorted(early + middle + late + future)
    assert statuses(db, held) == ["held"]
    first = outbox.claim(db, now=NOW + 200, lease_until=NOW + 230, limit=10)
    assert {c.event_id for c in first} == {"e1", "e2", "e3", "e4"}
    one = next(c for c in first if c.seq == late[0])
    assert (one.project_id, one.user_id, one.pixel_id, one.attempts) == (PROJECT, USER, PIXEL, 0)
    assert orjson.loads(one.data) == event(1)
    assert one.expires_at == outbox.expires_at(event(1))


def test_renew_extends_the_lease_of_rows_still_queued_only(db):
    seqs = add(db, new(1), new(2))
    assert claimed(db, now=NOW) == seqs
    outbox.mark_delivered(db, seqs[1:], now=NOW, fbtrace_id="T")
    outbox.renew(db, seqs, lease_until=NOW + 100)
    assert claimed(db, now=NOW + LEASE + 1) == []  # renewed past the first lease
    assert claimed(db, now=NOW + 101) == seqs[:1]
    assert (get(db, seqs[1]).status, get(db, seqs[1]).next_at) == ("delivered", NOW + LEASE)


def test_mark_delivered_counts_only_rows_still_pending(db):
    seqs = add(db, *(new(n) for n in range(6)))
    outbox.mark_failed(db, seqs[4:5], now=NOW, error=REJECTED)
    outbox.mark_held(db, seqs[3:4], now=NOW, error=REFUSED)
    # runs of consecutive seqs, a gap, a held row (delivered when its request had gone out)
    chosen = [seqs[0], seqs[1], seqs[3], seqs[4], seqs[5]]
    assert outbox.mark_delivered(db, chosen, now=NOW + 5, fbtrace_id="Trace1") == 4
    assert outbox.mark_delivered(db, chosen, now=NOW + 6, fbtrace_id="Trace2") == 0
    assert statuses(db, seqs) == ["delivered", "delivered", "queued", "delivered", "failed",
                                  "delivered"]  # fmt: skip
    done = get(db, seqs[3])
    assert (done.attempts, done.fbtrace_id, done.error, done.updated_at) == (2, "Trace1", None,
                                                                             NOW + 5)  # fmt: skip


def test_mark_failed_held_and_reschedule(db):
    seqs = add(db, *(new(n) for n in range(4)))
    assert outbox.mark_failed(db, seqs[:1], now=NOW + 1, error=REJECTED) == 1
    assert outbox.mark_failed(db, seqs[1:2], now=NOW + 1, error=REJECTED, attempted=False) == 1
    assert outbox.mark_failed(db, seqs[:1], now=NOW + 2, error=REFUSED) == 0  # settled already
    assert [get(db, s).attempts for s in seqs[:2]] == [1, 0]
    assert orjson.loads(get(db, seqs[0]).error or b"") == REJECTED

    outbox.mark_held(db, seqs[2:3], now=NOW + 3, error=REFUSED)
    outbox.mark_held(db, seqs[:1], now=NOW + 3, error=REFUSED)  # only a queued row is held
    assert statuses(db, seqs[:3]) == ["failed", "failed", "held"]

    outbox.reschedule(db, [(seqs[3], NOW + 50)], now=NOW + 4, error=REJECTED)
    outbox.reschedule(db, [(seqs[3], NOW + 70)], now=NOW + 5, error=None, attempted=False)
    again = get(db, seqs[3])
    assert (again.status, again.next_at, again.attempts, again.updated_at) == ("queued", NOW + 70,
                                                                                 1, NOW + 5)  # fmt: skip
    assert orjson.loads(again.error or b"") == REJECTED  # no new error keeps the last one
    outbox.reschedule(db, [(seqs[2], NOW)], now=NOW, error=None)  # a held row stays held
    assert get(db, seqs[2]).status == "held"


def held_rows(db: Connection) -> dict[str, list[int]]:
    rows = {
        "mine": add(db, new("m1", credential="c-mine"), new("m2", credential="c-mine")),
        "other": add(db, new("o1", credential="c-other")),
        "project": add(db, new("p1")),  # for the project's token
        "elsewhere": add(db, new("x1", project=OTHER_PROJECT, credential="c-mine")),
    }
    outbox.mark_held(db, [s for seqs in rows.values() for s in seqs], now=NOW - 5, error=REFUSED)
    return rows


def test_release_held_by_credential_project_token_project_and_all(db):
    rows = held_rows(db)
    release = outbox.release_held
    assert release(db, now=NOW, project_id=PROJECT, credential_id="c-mine", limit=1) == 1
    assert release(db, now=NOW, project_id=PROJECT, credential_id="c-mine") == 1
    assert statuses(db, rows["mine"]) == ["queued", "queued"]
    assert get(db, rows["mine"][0]).next_at == NOW  # due now
    assert statuses(db, rows["other"] + rows["project"] + rows["elsewhere"]) == ["held"] * 3

    assert release(db, now=NOW, project_id=PROJECT, project_token=True) == 1
    assert statuses(db, rows["project"] + rows["other"]) == ["queued", "held"]
    assert release(db, now=NOW, project_id=PROJECT) == 1
    assert statuses(db, rows["other"] + rows["elsewhere"]) == ["queued", "held"]
    assert release(db, now=NOW) == 1
    assert statuses(db, rows["elsewhere"]) == ["queued"]
    assert release(db, now=NOW) == 0
    with pytest.raises(ValueError, match="project"):
        release(db, now=NOW, credential_id="c-mine")


def test_fail_held_fails_one_credentials_held_rows_only(db):
    rows = held_rows(db)
    gone = outbox.CREDENTIAL_REMOVED
    fail = outbox.fail_held
    assert fail(db, now=NOW, project_id=PROJECT, credential_id="c-mine", error=gone, limit=1) == 1
    assert fail(db, now=NOW, project_id=PROJECT, credential_id="c-mine", error=gone) == 1
    assert statuses(db, rows["mine"]) == ["failed", "failed"]
    assert orjson.loads(get(db, rows["mine"][0]).error or b"") == gone
    assert statuses(db, rows["other"] + rows["project"] + rows["elsewhere"]) == ["held"] * 3


def test_replay_by_ids_seqs_and_all_failed_leaves_superseded_rows_alone(db):
    failed = add(db, *(new(n) for n in range(5)), new("other-user", user="user-2"))
    outbox.mark_failed(db, failed, now=NOW + 1, error=REJECTED)
    superseded = add(db, new("again"))
    outbox.mark_failed(db, superseded, now=NOW + 1, error=REJECTED)
    newer = add(db, new("again"))  # the caller sent it again; the newer row went out
    outbox.mark_delivered(db, newer, now=NOW + 2, fbtrace_id="T")
    elsewhere = add(db, new(0, project=OTHER_PROJECT))
    outbox.mark_failed(db, elsewhere, now=NOW + 1, error=REJECTED)

    dry = outbox.replay(db, now=NOW + 9, project_id=PROJECT, event_ids=["e0", "eagain"],
                        dry_run=True)  # fmt: skip
    assert [r.seq for r in dry] == failed[:1] and statuses(db, failed[:1]) == ["failed"]
    replayed = outbox.replay(db, now=NOW + 10, project_id=PROJECT, event_ids=["e0", "eagain"])
    assert [(r.seq, r.status) for r in replayed] == [(failed[0], "failed")]  # as they were
    assert statuses(db, [failed[0], *superseded, *elsewhere]) == ["queued", "failed", "failed"]
    back = get(db, failed[0])
    assert (back.attempts, back.error, back.next_at, back.updated_at) == (0, None, NOW + 10,
                                                                          NOW + 10)  # fmt: skip
    assert claimed(db, now=NOW + 10) == failed[:1]  # due now
    with pytest.raises(ValueError, match="project"):
        outbox.replay(db, now=NOW, event_ids=["e1"])

    assert [r.seq for r in outbox.replay(db, now=NOW, seqs=[failed[1], *superseded])] == [failed[1]]
    # all failed, in steps: after_seq goes on from the last one returned
    step = outbox.replay(db, now=NOW, project_id=PROJECT, all_failed=True, limit=2)
    assert [r.seq for r in step] == failed[2:4]
    rest = outbox.replay(db, now=NOW, project_id=PROJECT, all_failed=True, after_seq=step[-1].seq)
    assert [r.seq for r in rest] == failed[4:6]
    assert outbox.replay(db, now=NOW, project_id=PROJECT, all_failed=True) == []
    assert [r.seq for r in outbox.replay(db, now=NOW, all_failed=True)] == elsewhere
    assert statuses(db, superseded) == ["failed"]


def test_prune_deletes_finished_rows_before_the_cutoff_in_batches(db):
    old = add(db, *(new(n) for n in range(3)))
    outbox.mark_delivered(db, old[:2], now=NOW - 100, fbtrace_id=None)
    outbox.mark_failed(db, old[2:], now=NOW - 100, error=REJECTED)
    recent = add(db, new(3))
    outbox.mark_delivered(db, recent, now=NOW, fbtrace_id=None)
    pending = add(db, new(4), now=NOW - 1000)
    assert outbox.prune(db, before=NOW - 50, limit=2) == 2
    assert outbox.prune(db, before=NOW - 50) == 1
    assert outbox.prune(db, before=NOW - 50) == 0
    assert queries.by_seq(db, old) == []
    assert statuses(db, recent + pending) == ["delivered", "queued"]


# --- the outbox: reading --------------------------------------------------------------------


def test_event_status_is_the_users_newest_row_of_the_event(db):
    first = add(db, new(1))
    outbox.mark_failed(db, first, now=NOW, error=REJECTED)
    second = add(db, new(1))
    add(db, new(1, user="user-2"))
    found = outbox.event_status(db, PROJECT, USER, "e1")
    assert found is not None and (found.seq, found.status) == (second[0], "queued")
    assert outbox.event_status(db, PROJECT, "user-3", "e1") is None
    assert outbox.event_status(db, OTHER_PROJECT, USER, "e1") is None
    assert found.public()["status"] == "queued"


def test_list_events_filters_and_goes_newest_first(db):
    a = add(db, new(1), now=NOW - 100)
    b = add(db, new(2, project=OTHER_PROJECT), now=NOW - 50)
    c = add(db, new(3))
    outbox.mark_failed(db, c, now=NOW, error=REJECTED)

    def listed(**filters: Any) -> list[int]:
        return [row.seq for row in outbox.list_events(db, **filters)]

    assert listed() == c + b + a
    assert listed(project_id=PROJECT) == c + a
    assert listed(status="failed") == c
    assert listed(status="queued", project_id=OTHER_PROJECT) == b
    assert listed(since=NOW - 60) == c + b
    assert listed(limit=1) == c


def test_stats_gauges_and_pending_counts(db):
    assert outbox.stats(db)["by_status"] == dict.fromkeys(outbox.STATUSES, 0)
    assert (outbox.pending_count(db), outbox.oldest_pending(db), outbox.next_due(db)) == (0, None,
                                                                                          None)  # fmt: skip
    assert outbox.gauges(db) == (0, 0, 0, None)
    queued = add(db, new(1), new(2), now=NOW - 30, next_at=NOW + 5)
    held = add(db, new(3, pixel=OTHER_PIXEL), now=NOW - 90)
    outbox.mark_held(db, held, now=NOW, error=REFUSED)
    done = add(db, new(4), new(5, project=OTHER_PROJECT), now=NOW - 500)
    outbox.mark_delivered(db, done[:1], now=NOW, fbtrace_id=None)
    outbox.mark_failed(db, done[1:], now=NOW, error=REJECTED)

    assert outbox.pending_count(db) == 3
    assert outbox.oldest_pending(db) == NOW - 90
    assert outbox.next_due(db) == NOW + 5
    assert outbox.gauges(db) == (2, 1, 1, NOW - 90)
    everything = outbox.stats(db)
    assert everything["by_status"] == {"queued": 2, "held": 1, "delivered": 1, "failed": 1}
    assert everything["oldest_pending"] == NOW - 90
    assert everything["pixels"][PIXEL] == {"queued": 2, "held": 0, "delivered": 1, "failed": 1,
                                           "oldest_pending": NOW - 30}  # fmt: skip
    assert everything["pixels"][OTHER_PIXEL]["held"] == 1
    mine = outbox.stats(db, project_id=PROJECT)
    assert mine["by_status"] == {"queued": 2, "held": 1, "delivered": 1, "failed": 0}
    assert len(queued) == 2


def test_the_servers_reads_see_the_clis_writes_at_once(storage, db):
    async def body(server: Served) -> None:
        queue = server.queue
        assert await queue.answers(timeout=2)  # the readiness probe's check
        assert await queue.read(outbox.pending_count) == 0
        seqs = add(db, new(1), new(2))
        assert await queue.read(outbox.pending_count) == 2
        outbox.mark_failed(db, seqs, now=NOW, error=REJECTED)
        await queue.write(lambda w: outbox.replay(w, now=NOW, seqs=seqs[:1]))
        assert statuses(db, seqs) == ["queued", "failed"]  # and the CLI sees the server's
        assert queue.read_now(lambda r: outbox.gauges(r)[:3]) == (1, 0, 1)

    served(storage, body)


def test_the_consoles_reads(db):
    seqs = add(db, new(1), new(2, pixel=OTHER_PIXEL), new(3), now=NOW - 10)
    outbox.mark_failed(db, seqs[:2], now=NOW - 5, error=REJECTED)
    outbox.mark_failed(db, seqs[2:], now=NOW, error=REFUSED)
    assert [r.seq for r in queries.failed(db, limit=10)] == [seqs[2], seqs[1], seqs[0]]
    by_code = queries.failed(db, code="UPSTREAM_REJECTED", limit=10)
    assert [r.seq for r in by_code] == [seqs[1], seqs[0]]
    assert [r.seq for r in queries.failed(db, pixel_id=OTHER_PIXEL, limit=10)] == [seqs[1]]
    assert [r.seq for r in queries.by_seq(db, [seqs[2], 10**9, seqs[0]])] == [seqs[2], seqs[0]]
    again = add(db, new(1))
    assert [r.seq for r in queries.lookup(db, [PROJECT, OTHER_PROJECT], "e1", limit=5)] == [
        again[0], seqs[0]
    ]  # fmt: skip
    assert queries.failure(get(db, seqs[0])).code == "UPSTREAM_REJECTED"


# --- credentials --------------------------------------------------------------------------


def test_set_find_and_by_id(settings: Config, store: CredentialStore):
    first, new_one = store.set(PROJECT, USER, "EAAB-first", external_id="acct-a", label="A")
    assert new_one and first.default and first.status == "valid" and first.label == "A"
    second, _ = store.set(PROJECT, USER, "EAAB-second")
    assert not second.default  # the first stays the default
    theirs, _ = store.set(PROJECT, "user-2", "EAAB-theirs")
    assert theirs.default

    def found(selector: str | None, user: str = USER) -> str | None:
        credential = store.find(PROJECT, user, selector)
        return None if credential is None else credential.id

    assert found(None) == first.id
    assert found("ext:acct-a") == first.id
    assert found(second.id) == second.id
    assert found(second.id.upper()) == second.id  # UUIDs in any case
    assert found(theirs.id) is None  # never another user's
    assert found("ext:nothing") is None and found(None, "user-3") is None
    assert store.find(OTHER_PROJECT, USER) is None
    assert store.by_id(PROJECT, theirs.id) == theirs
    assert store.by_id(PROJECT, "no-such-id") is None
    assert store.get(PROJECT, USER) == "EAAB-first"

    renewed, is_new = store.set(PROJECT, USER, "EAAB-first-2", external_id="acct-a")
    assert (renewed.id, is_new, renewed.label, renewed.default) == (first.id, False, "A", True)
    moved, _ = store.set(PROJECT, USER, "EAAB-second-2", credential_id=second.id, make_default=True)
    assert moved.default and not store.by_id(PROJECT, first.id).default  # type: ignore[union-attr]
    assert store.token_of(settings.projects[PROJECT], second.id) == "EAAB-second-2"
    assert store.token_of(settings.projects[PROJECT], None) == TOKEN
    with pytest.raises(ConfigError, match="another user"):
        store.set(PROJECT, USER, "EAAB-x", credential_id=theirs.id)


def test_the_servers_lookups_see_the_clis_credentials_at_once(settings, storage, store):
    project = settings.projects[PROJECT]

    async def body(server: Served) -> None:
        credentials = server.credentials
        assert await credentials.find(PROJECT, USER) is None
        made, _ = store.set(PROJECT, USER, "EAAB-from-the-cli", external_id="acct")
        by_default = await credentials.find(PROJECT, USER)
        assert by_default is not None and by_default.id == made.id
        assert (await credentials.find(PROJECT, USER, "ext:acct")) == by_default
        assert (await credentials.find(PROJECT, USER, made.id.upper())) == by_default
        assert (await credentials.by_id(PROJECT, made.id)) == by_default
        assert await credentials.token_of(project, made.id) == "EAAB-from-the-cli"
        assert await credentials.token_of(project, None) == TOKEN
        store.remove(PROJECT, made.id)
        assert await credentials.token_of(project, made.id) is None

    served(storage, body)


def test_remove_makes_the_most_recently_updated_other_credential_the_default(store, monkeypatch):
    ticks = iter(range(1_000_000, 2_000_000, 10))  # whole seconds apart: updated_at's unit
    monkeypatch.setattr(credentials_module, "time", SimpleNamespace(time=lambda: next(ticks)))
    default, _ = store.set(PROJECT, USER, "EAAB-1")
    older, _ = store.set(PROJECT, USER, "EAAB-2")
    newer, _ = store.set(PROJECT, USER, "EAAB-3")
    store.set(PROJECT, USER, "EAAB-2b", credential_id=older.id)  # updated last
    assert store.remove(PROJECT, newer.id) is not None  # not the default: nothing moves
    assert store.by_id(PROJECT, default.id).default
    removed = store.remove(PROJECT, default.id)
    assert removed is not None and removed.id == default.id
    heir = store.find(PROJECT, USER)
    assert heir is not None and heir.id == older.id
    assert store.remove(PROJECT, default.id) is None
    assert store.remove(PROJECT, older.id) is not None
    assert store.find(PROJECT, USER) is None


def test_two_clis_setting_a_new_users_credential_at_once_take_turns(storage, monkeypatch):
    """Two `credentials set` for a user with none, at once: as if one ran after the other
    (the first is the default, the same external id is one credential), never a duplicate
    key error."""
    with closing(open_credentials(storage)) as a, closing(open_credentials(storage)) as b:
        slow = threading.Event()
        real = a._make_default

        def make_default_slowly(project_id: str, user_id: str, credential_id: str) -> None:
            real(project_id, user_id, credential_id)
            slow.set()
            time.sleep(0.3)  # A is about to commit; B starts meanwhile

        monkeypatch.setattr(a, "_make_default", make_default_slowly)
        first: list[Any] = []
        call = threading.Thread(
            target=lambda: first.append(a.set(PROJECT, "user-9", "EAAB-a", external_id="acct"))
        )
        call.start()
        assert slow.wait(5)
        second, is_new = b.set(PROJECT, "user-9", "EAAB-b", external_id="acct")
        call.join(5)
        [(made, made_new)] = first
        assert (made_new, made.default) == (True, True)
        assert (second.id, is_new, second.default) == (made.id, False, True)  # the same one
        assert b.get(PROJECT, "user-9") == "EAAB-b"
        assert len(b.list(PROJECT, "user-9")) == 1
        third, _ = b.set(PROJECT, "user-9", "EAAB-c")
        assert not third.default


def test_list_filters_by_project_and_user(store: CredentialStore):
    a, _ = store.set(PROJECT, USER, "EAAB-a")
    b, _ = store.set(PROJECT, "user-2", "EAAB-b")
    c, _ = store.set(OTHER_PROJECT, USER, "EAAB-c")
    assert [x.id for x in store.list()] == [a.id, b.id, c.id]
    assert [x.id for x in store.list(PROJECT)] == [a.id, b.id]
    assert [x.id for x in store.list(user_id=USER)] == [a.id, c.id]
    assert [x.id for x in store.list(PROJECT, "user-2")] == [b.id]
    assert store.list("nobody") == []


def test_mark_invalid_with_and_without_the_refused_token(storage, store, db):
    credential, _ = store.set(PROJECT, USER, "EAAB-old")
    error = {**REFUSED, "upstream": {"code": 190}}
    mark_invalid(db, PROJECT, credential.id, error, refused=b"another sealed token")
    assert store.by_id(PROJECT, credential.id).status == "valid"
    mark_invalid(db, PROJECT, credential.id, error, refused=credential.sealed_token)
    invalid = store.by_id(PROJECT, credential.id)
    assert invalid is not None and (invalid.status, invalid.status_error) == ("invalid", error)
    store.set(PROJECT, USER, "EAAB-new", credential_id=credential.id)
    assert store.by_id(PROJECT, credential.id).status == "valid"
    mark_invalid(db, PROJECT, credential.id, error)
    assert store.by_id(PROJECT, credential.id).status == "invalid"


def test_write_uses_only_moves_forward(storage: StorageSettings, store: CredentialStore, db):
    a, _ = store.set(PROJECT, USER, "EAAB-a")
    b, _ = store.set(PROJECT, USER, "EAAB-b")
    write_uses(db, [(1000, PROJECT, a.id), (2000, PROJECT, b.id)])
    write_uses(db, [(1500, PROJECT, a.id), (1500, PROJECT, b.id), (9, PROJECT, "gone")])
    assert [store.by_id(PROJECT, x.id).last_used_at for x in (a, b)] == [1500, 2000]  # type: ignore[union-attr]
    database = open_database(storage.database_path, storage.url)
    try:
        server = Credentials(database, keyring_of(storage))
        server.open(PROJECT, a)  # a send with it: the server's view records the use
        write_uses(db, server.taken_uses())
    finally:
        database.close()
    used = store.by_id(PROJECT, a.id)
    assert used is not None and used.last_used_at is not None
    assert abs(used.last_used_at - time.time()) < 60


def at_once(
    storage: StorageSettings, write: Callable[[Connection, random.Random, int], None]
) -> None:
    """Two instances, each on its own connection, each running `write` for rounds 1 to 20,
    one transaction each, with its own order of rows, at the same moment; no error on either."""
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def instance(seed: int) -> None:
        order = random.Random(seed)
        try:
            with closing(connect_sync(storage.database_path, storage.url)) as connection:
                start.wait(5)
                for round_ in range(1, 21):
                    connection.execute("BEGIN IMMEDIATE")
                    write(connection, order, round_)
                    connection.execute("COMMIT")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=instance, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def test_instances_writing_last_uses_at_once_never_deadlock(storage, store):
    """Each instance writes the last uses it saw (once a minute), in its own order."""
    ids = [store.set(PROJECT, f"user-{n}", "EAAB-x")[0].id for n in range(20)]

    def write(connection: Connection, order: random.Random, at: int) -> None:
        write_uses(connection, [(at, PROJECT, i) for i in order.sample(ids, len(ids))])

    at_once(storage, write)
    assert {c.last_used_at for c in store.list(PROJECT)} == {20}


def test_keys_are_verified_and_rotated(storage: StorageSettings):
    first = new_secret_key()
    second = new_secret_key()

    def with_keys(*keys: str) -> StorageSettings:
        secret = parse_secret_keys(",".join(keys), "test keys") if keys else ()
        return dataclasses.replace(storage, secret_keys=secret)

    with closing(open_credentials(with_keys(first))) as store:
        for n in range(3):
            store.set(PROJECT, f"user-{n}", f"EAAB-{n}")
    with pytest.raises(ConfigError, match="no secret key"):
        open_credentials(with_keys())
    with pytest.raises(SecretKeyError):
        open_credentials(with_keys(second))
    with closing(open_credentials(with_keys(second, first))) as store:
        assert store.rotate() == 3
        assert store.rotate() == 0
        assert list(store.key_ids()) == [parse_secret_keys(second, "k")[0].id]
    with closing(open_credentials(with_keys(second))) as store:
        assert [store.get(PROJECT, f"user-{n}") for n in range(3)] == ["EAAB-0", "EAAB-1", "EAAB-2"]


# --- idempotency keys ---------------------------------------------------------------------


def answer(fingerprint: str, at: float, body: bytes = b'{"ok":true}') -> idempotency.Stored:
    return idempotency.Stored(fingerprint, 202, "application/json", {"location": "/x"}, body, at)


def test_idempotency_save_lookup_expiry_and_prune(db):
    ttl = idempotency.KEY_TTL_SECONDS
    idempotency.save(db, PROJECT, USER, "k1", answer("f1", NOW))
    found = idempotency.lookup(db, PROJECT, USER, "k1", since=NOW - ttl)
    assert found == answer("f1", NOW)
    assert idempotency.lookup(db, PROJECT, "user-2", "k1", since=NOW - ttl) is None
    assert idempotency.lookup(db, PROJECT, USER, "k1", since=NOW + 1) is None  # expired

    idempotency.save(db, PROJECT, USER, "k1", answer("f2", NOW + ttl - 1))  # live: kept
    assert idempotency.lookup(db, PROJECT, USER, "k1", since=0) == answer("f1", NOW)
    idempotency.save(db, PROJECT, USER, "k1", answer("f3", NOW + ttl + 1, b"x"))  # replaces
    assert idempotency.lookup(db, PROJECT, USER, "k1", since=NOW) == answer("f3", NOW + ttl + 1,
                                                                            b"x")  # fmt: skip

    idempotency.save(db, PROJECT, USER, "k2", answer("f", NOW))
    idempotency.save(db, PROJECT, USER, "k3", answer("f", NOW + 10))
    assert idempotency.prune(db, before=NOW + 5) == 1
    assert idempotency.prune(db, before=NOW + ttl * 2, limit=1) == 1
    assert idempotency.prune(db, before=NOW + ttl * 2) == 1
    assert idempotency.prune(db, before=NOW + ttl * 2) == 0


# --- per-minute counters ------------------------------------------------------------------


def counts(accepted: int = 0, delivered: int = 0, failed: int = 0, retried: int = 0,
           **coverage: int) -> list[int]:  # fmt: skip
    by_name = {"accepted": accepted, "delivered": delivered, "failed": failed,
               "retried": retried, **coverage}  # fmt: skip
    return [by_name.get(column, 0) for column in minutes.EVENT_COLUMNS]


def test_minutes_add_up_and_read_back(db):
    m0, m1, m2 = 1_795_000_020, 1_795_000_080, 1_795_000_140
    minutes.add(
        db,
        {(m0, PROJECT, PIXEL, "Purchase"): counts(3, em=2, ip_ua=1, none=1),
         (m1, PROJECT, PIXEL, "Lead"): counts(1, 1, fbp=1),
         (m1, PROJECT, OTHER_PIXEL, "Lead"): counts(5, 4, 1)},
        {(m0, PROJECT, PIXEL, "Purchase", "website"): 3},
        {(m1, PROJECT, OTHER_PIXEL, "UPSTREAM_REJECTED"): 1},
    )  # fmt: skip
    minutes.add(
        db,
        {(m0, PROJECT, PIXEL, "Purchase"): counts(2, 4, em=2),
         (m2, OTHER_PROJECT, PIXEL, ""): counts(retried=7)},
        {(m0, PROJECT, PIXEL, "Purchase", "website"): 2,
         (m0, PROJECT, PIXEL, "Purchase", "app"): 1},
        {(m1, PROJECT, OTHER_PIXEL, "UPSTREAM_REJECTED"): 2,
         (m2, PROJECT, PIXEL, "EVENT_EXPIRED"): 1},
    )  # fmt: skip

    assert minutes.series(db, m0, m2 + 60) == [(m0, 5, 4, 0, 0), (m1, 6, 5, 1, 0),
                                               (m2, 0, 0, 0, 7)]  # fmt: skip
    assert minutes.series(db, m1, m2, PROJECT, OTHER_PIXEL) == [(m1, 5, 4, 1, 0)]
    assert minutes.series(db, float(m0) + 0.5, m2) == [(m1, 6, 5, 1, 0)]  # a float bound
    # busiest first: 6 + 5 + 0 before 5 + 4 + 1
    assert minutes.pixels(db, m0) == [(PROJECT, PIXEL, 6, 5, 0), (PROJECT, OTHER_PIXEL, 5, 4, 1),
                                      (OTHER_PROJECT, PIXEL, 0, 0, 0)]  # fmt: skip
    coverage = minutes.coverage(db, m0, PROJECT, PIXEL)
    assert [(c.event_name, c.total, c.em, c.fbp, c.ip_ua, c.none) for c in coverage] == [
        ("Purchase", 5, 4, 0, 1, 1), ("Lead", 1, 0, 1, 0, 0), ("*", 6, 4, 1, 1, 1)
    ]  # fmt: skip
    assert minutes.coverage(db, m2, PROJECT, PIXEL) == []
    series = minutes.coverage_series(db, m0, m2, PROJECT, PIXEL)
    assert [(m, c.total, c.em) for m, c in series] == [(m0, 5, 4), (m1, 1, 0)]
    assert minutes.sources(db, m0, PROJECT, PIXEL) == [("Purchase", "website", 5),
                                                        ("Purchase", "app", 1)]  # fmt: skip
    assert minutes.failure_codes(db, m0) == [("UPSTREAM_REJECTED", 3), ("EVENT_EXPIRED", 1)]
    assert minutes.failure_codes(db, m0, PROJECT, PIXEL) == [("EVENT_EXPIRED", 1)]

    assert minutes.prune(db, before=m1, limit=1) == 2  # one row of each table holding m0
    assert minutes.prune(db, before=m1) == 1
    assert minutes.series(db, 0, m2 + 60)[0].minute == m1


def test_instances_adding_to_the_same_minutes_at_once_never_deadlock(storage, db):
    """Every instance flushes its counters (server/tally.py), each in its own order: all of
    them add up, none is lost to a deadlock between two instances' transactions."""
    keys = [(1_795_000_020, PROJECT, f"{n:015}", "Purchase") for n in range(20)]

    def write(connection: Connection, order: random.Random, _: int) -> None:
        shuffled = order.sample(keys, len(keys))
        minutes.add(connection, {k: counts(1) for k in shuffled}, {}, {})

    at_once(storage, write)
    assert minutes.series(db, 0, 2**40) == [(1_795_000_020, 800, 0, 0, 0)]


# --- the group-commit writer --------------------------------------------------------------


def test_a_job_that_raises_fails_alone_and_its_batch_commits(storage, db):
    """In one transaction with others (the writer was busy while they queued), a job that
    raises, in Python or in SQL, is rolled back alone."""

    def saving(
        key: str, then: Callable[[Connection], Any] | None = None
    ) -> Callable[[Connection], str]:
        def job(w: Connection) -> str:
            idempotency.save(w, PROJECT, USER, key, answer("f", NOW))
            if then is not None:
                then(w)
            return key

        return job

    def python_error(w: Connection) -> None:
        raise ValueError("a bug in one job")

    def sql_error(w: Connection) -> None:
        w.execute("SELECT no_such_column FROM outbox")

    async def body(server: Served) -> list[Any]:
        database = server.queue.database
        gate = threading.Event()
        blocker = database.submit(lambda _: gate.wait(5))
        jobs = [saving("a"), saving("b", python_error), saving("c"), saving("d", sql_error),
                saving("e")]  # fmt: skip
        futures: list[Awaitable[Any]] = [database.submit(job) for job in jobs]
        futures.append(asyncio.ensure_future(server.queue.enqueue([new(1), new(2)])))
        await asyncio.sleep(0)  # the enqueue has handed its rows to the writer
        gate.set()
        await blocker
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert not database.failing
        return outcomes

    outcomes = served(storage, body)
    assert [outcomes[i] for i in (0, 2, 4)] == ["a", "c", "e"]
    assert isinstance(outcomes[1], ValueError)
    assert isinstance(outcomes[3], Exception) and not isinstance(outcomes[3], ValueError)
    kept = [k for k in "abcde" if idempotency.lookup(db, PROJECT, USER, k, since=0) is not None]
    assert kept == ["a", "c", "e"]
    assert event_ids(db, outcomes[5]) == ["e1", "e2"]  # the events queued in it, once
    assert outbox.pending_count(db) == 2


# --- the schema ---------------------------------------------------------------------------


def test_upgrading_twice_changes_nothing(storage: StorageSettings, store: CredentialStore):
    before, after = upgrade_schema(storage)
    assert before == after  # the store's opening brought it up to date
    store.set(PROJECT, USER, "EAAB-kept")
    assert upgrade_schema(storage) == (after, after)
    with closing(connect_sync(storage.database_path, storage.url)) as db:
        add(db, new(1))
    assert upgrade_schema(storage) == (after, after)
    assert store.get(PROJECT, USER) == "EAAB-kept"
    with closing(connect_sync(storage.database_path, storage.url)) as db:
        assert outbox.pending_count(db) == 1


def test_a_fresh_database_is_upgraded_from_nothing(storage: StorageSettings):
    before, after = upgrade_schema(storage)
    assert before == 0 and after > 0


def test_instances_starting_at_once_on_a_fresh_database_all_upgrade_it(storage):
    start = threading.Barrier(4)
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def instance() -> None:
        try:
            start.wait(5)
            results.append(upgrade_schema(storage))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=instance) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(results) == 4 and len({after for _, after in results}) == 1
    version = results[0][1]
    assert upgrade_schema(storage) == (version, version)


def test_a_database_a_newer_funnelgate_upgraded_is_refused(storage):
    _, version = upgrade_schema(storage)
    with closing(connect_sync(storage.database_path, storage.url)) as db:
        if storage.url is None:
            db.execute(f"PRAGMA user_version = {version + 1}")
        else:
            db.execute("UPDATE funnelgate_schema SET version = ?", (version + 1,))
    with pytest.raises(ConfigError, match="newer funnelgate"):
        upgrade_schema(storage)
    with pytest.raises(ConfigError, match="newer funnelgate"):
        open_credentials(storage)


# --- reads while the database is gone -----------------------------------------------------


def test_reads_from_a_database_that_refuses_connections_are_storage_unavailable(
    postgres_url: str, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, monkeypatch
):
    """Not a hang, not a driver's error: 503 STORAGE_UNAVAILABLE within the connect timeout."""
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT_SECONDS", 1)
    storage = make_config(tmp_path, rsa_key, database_url=postgres_url).storage
    refusing = f"postgresql://postgres@127.0.0.1:{free_port()}/funnelgate"

    async def body(server: Served) -> None:
        gone = open_database(storage.database_path, refusing)
        working, server.queue.database = server.queue.database, gone
        try:
            started = time.monotonic()
            with pytest.raises(StorageUnavailable):
                await server.queue.read(outbox.pending_count)
            assert time.monotonic() - started < 3
            assert not await server.queue.answers(timeout=2)
            started = time.monotonic()
            with pytest.raises(StorageUnavailable):
                await Credentials(gone, keyring_of(storage)).find(PROJECT, USER)
            assert time.monotonic() - started < 3
        finally:
            server.queue.database = working
            gone.close()

    served(storage, body)
    with pytest.raises(ConfigError, match=r"storage postgresql 127\.0\.0\.1/funnelgate"):
        upgrade_schema(dataclasses.replace(storage, url=refusing))


# --- PostgreSQL only: several instances on one database -----------------------------------


def pg_storage(url: str, tmp_path: Path, key: rsa.RSAPrivateKey) -> StorageSettings:
    return make_config(tmp_path, key, database_url=url).storage


def test_instances_upgrading_at_once_all_succeed_with_one_schema(postgres_url: str):
    """Four instances start together on an empty database: one applies the migrations under
    the advisory lock, the others wait and find them done (no duplicate-object error)."""
    start = threading.Barrier(4)
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def instance() -> None:
        try:
            with closing(postgres.connect(postgres_url)) as connection:
                start.wait(5)
                results.append(schema_pg.upgrade(connection))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=instance) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(results) == [(0, schema_pg.VERSION)] + [(schema_pg.VERSION,) * 2] * 3
    with closing(postgres.connect(postgres_url)) as connection:
        assert connection.execute("SELECT version FROM funnelgate_schema").fetchall() == [
            (schema_pg.VERSION,)
        ]
        assert schema_pg.version(connection) == schema_pg.VERSION


def test_claims_on_two_connections_at_once_take_disjoint_rows(postgres_url, tmp_path, rsa_key):
    upgrade_schema(pg_storage(postgres_url, tmp_path, rsa_key))
    with closing(postgres.connect(postgres_url)) as a, closing(postgres.connect(postgres_url)) as b:
        seqs = add(a, *(new(n) for n in range(10)))
        b.execute("SET statement_timeout = 5000")  # a claim that waited on A's locks fails
        a.execute("BEGIN")
        mine = claimed(a, now=NOW, limit=4)  # A's claim is not committed yet
        theirs = claimed(b, now=NOW, limit=10)  # B skips the rows A holds, does not wait
        a.execute("COMMIT")
        assert len(mine) == 4 and len(theirs) == 6
        assert sorted(mine + theirs) == seqs


def test_many_claimers_together_take_every_row_once(postgres_url, tmp_path, rsa_key):
    upgrade_schema(pg_storage(postgres_url, tmp_path, rsa_key))
    with closing(postgres.connect(postgres_url)) as db:
        seqs = add(db, *(new(n) for n in range(300)))
    taken: list[list[int]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def claimer(mine: list[int]) -> None:
        with closing(postgres.connect(postgres_url)) as connection:
            start.wait(5)
            while got := claimed(connection, now=NOW, limit=7):
                mine += got

    threads = [threading.Thread(target=claimer, args=(mine,)) for mine in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    every = [seq for mine in taken for seq in mine]
    assert sorted(every) == seqs  # all of them, none twice


def test_a_job_meeting_a_statement_timeout_fails_alone(postgres_url, tmp_path, rsa_key):
    """A job's own server-side error that leaves the connection alive (a statement timeout, a
    deadlock with another instance) is that job's failure: the others of its batch commit."""
    storage = pg_storage(postgres_url, tmp_path, rsa_key)

    def slow(w: Connection) -> None:
        w.execute("SET LOCAL statement_timeout = 10")
        w.execute("SELECT pg_sleep(1)")

    async def body(server: Served) -> list[Any]:
        database = server.queue.database
        gate = threading.Event()
        blocker = database.submit(lambda _: gate.wait(5))
        futures = [
            database.submit(lambda w: idempotency.save(w, PROJECT, USER, "a", answer("f", NOW))),
            database.submit(slow),
            database.submit(lambda w: idempotency.save(w, PROJECT, USER, "b", answer("f", NOW))),
        ]
        gate.set()
        await blocker
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert not database.failing
        return outcomes

    outcomes = served(storage, body)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], psycopg.errors.QueryCanceled)


def test_new_replayed_and_released_events_wake_every_listener(postgres_url, tmp_path, rsa_key):
    storage = pg_storage(postgres_url, tmp_path, rsa_key)

    async def body(server: Served) -> None:
        woken = asyncio.Event()
        server.queue.database.listen(woken.set)
        await asyncio.wait_for(woken.wait(), 5)  # once on connecting: a notice may be missed
        with closing(connect_sync(storage.database_path, storage.url)) as cli:

            async def wakes(change: Callable[[], Any]) -> None:
                woken.clear()
                await asyncio.to_thread(change)
                await asyncio.wait_for(woken.wait(), 1.5)

            other = Outbox(open_database(storage.database_path, storage.url), clock=lambda: NOW)
            try:  # another instance queues (its own dispatcher it wakes in process)
                woken.clear()
                seqs = await other.enqueue([new(1), new(2)])
                await asyncio.wait_for(woken.wait(), 1.5)
            finally:
                other.close()
            woken.clear()
            outbox.mark_failed(cli, seqs[:1], now=NOW, error=REJECTED)
            outbox.mark_held(cli, seqs[1:], now=NOW, error=REFUSED)
            await asyncio.sleep(0.3)
            assert not woken.is_set()  # settling rows wakes nobody
            await wakes(lambda: outbox.replay(cli, now=NOW, seqs=seqs[:1]))
            await wakes(lambda: outbox.release_held(cli, now=NOW, project_id=PROJECT))

    served(storage, body)


def test_empty_calls_change_nothing(storage, db):
    async def body(server: Served) -> list[int]:
        return await server.queue.enqueue([])

    assert served(storage, body) == []
    assert add(db) == []
    assert outbox.mark_delivered(db, [], now=NOW, fbtrace_id=None) == 0
    assert outbox.mark_failed(db, [], now=NOW, error=REJECTED) == 0
    outbox.mark_held(db, [], now=NOW, error=REFUSED)
    outbox.renew(db, [], lease_until=NOW)
    outbox.reschedule(db, [], now=NOW, error=None)
    assert outbox.replay(db, now=NOW, seqs=[]) == []
    assert outbox.claim(db, now=NOW, lease_until=NOW + 1, limit=10) == []
    minutes.add(db, {}, {}, {})
    write_uses(db, [])
    assert outbox.stats(db)["by_status"] == dict.fromkeys(outbox.STATUSES, 0)


def test_a_listening_database_closes_at_once(postgres_url, tmp_path, rsa_key):
    """A server's shutdown does not wait on the listener's wait for notices."""
    storage = pg_storage(postgres_url, tmp_path, rsa_key)
    upgrade_schema(storage)

    async def body() -> float:
        database = open_database(storage.database_path, storage.url)
        woken = asyncio.Event()
        database.listen(woken.set)
        await asyncio.wait_for(woken.wait(), 5)  # listening
        await asyncio.sleep(0.05)
        started = time.monotonic()
        database.close()
        return time.monotonic() - started

    assert asyncio.run(body()) < 0.5
