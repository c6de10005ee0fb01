"""The dispatcher on a real outbox, on each backend (a SQLite file, then PostgreSQL), Graph
faked in-process by Meta's rules, on a clock the test moves: grouping, bisection, holds,
backoff, expiry, leases and shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import Config
from server.delivery import dispatcher as dispatcher_module
from server.delivery.dispatcher import LEASE_SECONDS, Dispatcher
from server.delivery.graph import GraphClient
from server.delivery.throttle import Breakers
from server.errors import StorageUnavailable
from server.storage import outbox
from server.storage.credentials import (
    Credentials,
    keyring_of,
    open_credentials,
)
from server.storage.crypto import SecretKeyError
from server.storage.database import Connection, connect_sync, open_database
from server.storage.outbox import NewEvent, Outbox
from tests.support import NOW, PIXEL, PROJECT, FakeGraph, Step, graph_error, make_config

T = TypeVar("T")
TOKEN = "EAAB-project-token"
USER = "user-1"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def event(n: int, **fields: Any) -> dict[str, Any]:
    return {"event_name": "Lead", "event_time": int(NOW) - 60, "action_source": "chat",
            "event_id": f"e{n}", "user_data": {"external_id": ["0" * 64]}, **fields}  # fmt: skip


def new(
    n: int,
    *,
    pixel: str = PIXEL,
    test_code: str | None = None,
    credential: str | None = None,
    **fields: Any,
) -> NewEvent:
    e = event(n, **fields)
    return NewEvent(PROJECT, USER, credential, pixel, test_code, e, orjson.dumps(e))


class Harness:
    def __init__(
        self, tmp_path: Path, key: rsa.RSAPrivateKey, graph: FakeGraph, database_url: str | None
    ) -> None:
        self.clock = Clock()
        self.graph = graph
        self.config: Config = make_config(
            tmp_path, key, facebook_access_token=TOKEN, database_url=database_url
        )
        self.path = self.config.storage.database_path

    def run(self, body: Callable[[Outbox, Dispatcher], Awaitable[Any]]) -> Any:
        async def go() -> Any:
            open_credentials(self.config.storage).close()  # the schema, as the server makes it
            database = open_database(self.path, self.config.storage.url)
            queue = Outbox(database, clock=self.clock)
            credentials = Credentials(queue.database, keyring_of(self.config.storage))
            client = GraphClient(
                self.config.graph, self.graph.transport(), breakers=Breakers(clock=self.clock)
            )
            dispatcher = Dispatcher(queue, client, credentials, self.config, clock=self.clock)
            dispatcher.start()
            try:
                return await body(queue, dispatcher)
            finally:
                await dispatcher.stop(timeout=1)
                await client.aclose()
                queue.close()

        return asyncio.run(go())

    def read(self, job: Callable[[Connection], T]) -> T:
        """`job` on a connection of its own, as the CLI reads."""
        with closing(connect_sync(self.path, self.config.storage.url)) as db:
            return job(db)


@pytest.fixture
def harness(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, graph: FakeGraph, backend: str | None
) -> Harness:
    return Harness(tmp_path, rsa_key, graph, backend)


async def until(
    queue: Outbox, done: Callable[[dict[str, int]], bool], seconds: float = 10
) -> dict[str, int]:
    """Counts by status once `done(counts)` holds (bounded)."""
    deadline = time.monotonic() + seconds
    while True:
        counts: dict[str, int] = queue.read_now(outbox.stats)["by_status"]
        if done(counts) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.01)


def rows(queue: Outbox | Harness) -> dict[str, outbox.EventStatus]:
    listed = (queue.read_now if isinstance(queue, Outbox) else queue.read)(
        lambda db: outbox.list_events(db, limit=10_000)
    )
    return {r.event_id: r for r in listed}


def test_events_go_in_requests_of_up_to_1000_per_pixel_and_test_code(harness):
    async def body(queue: Outbox, dispatcher: Dispatcher) -> dict[str, int]:
        await queue.enqueue([new(n) for n in range(2500)])
        await queue.enqueue([new(n, pixel="222222222222222") for n in range(2500, 2510)])
        await queue.enqueue([new(n, test_code="TEST1") for n in range(2510, 2520)])
        dispatcher.wake()
        return await until(queue, lambda c: c["delivered"] == 2520)

    assert harness.run(body)["delivered"] == 2520
    sizes = sorted(len(b["data"]) for b in harness.graph.bodies())
    assert sizes == [10, 10, 500, 1000, 1000]
    by_code = {b.get("test_event_code"): len(b["data"]) for b in harness.graph.bodies()}
    assert by_code["TEST1"] == 10
    assert all(b["access_token"] == TOKEN for b in harness.graph.bodies())
    sent = [e["event_id"] for b in harness.graph.bodies() for e in b["data"]]
    assert sorted(sent) == sorted(f"e{n}" for n in range(2520))  # each once


def test_one_bad_event_in_1000_is_isolated_by_bisection(harness):
    """Meta refuses a request whole for one bad event (here an e-mail sent unhashed)."""

    async def body(queue: Outbox, dispatcher: Dispatcher) -> dict[str, int]:
        events = [new(n) for n in range(1000)]
        events[617] = new(617, user_data={"em": ["joe@example.com"]})
        await queue.enqueue(events)
        dispatcher.wake()
        return await until(queue, lambda c: c["delivered"] + c["failed"] == 1000)

    assert harness.run(body) | {} == {"queued": 0, "held": 0, "delivered": 999, "failed": 1}
    requests = len(harness.graph.received)
    assert requests <= 2 * 10 + 1  # two halves per level, log2(1000) < 10 levels
    failed = rows(harness)["e617"]
    assert failed.status == "failed"
    error = orjson.loads(failed.error or b"{}")
    assert error["code"] == "UPSTREAM_REJECTED"
    assert error["upstream"]["code"] == 100 and error["upstream"]["fbtrace_id"]


def test_a_refused_credential_holds_its_events_until_released(harness):
    harness.graph.script.append(graph_error(400, 190, error_subcode=463))

    async def body(queue: Outbox, dispatcher: Dispatcher) -> tuple[dict[str, int], dict[str, int]]:
        await queue.enqueue([new(n) for n in range(3)])
        dispatcher.wake()
        held = await until(queue, lambda c: c["held"] == 3)
        await queue.write(lambda db: outbox.release_held(db, now=harness.clock(),
                                                          project_id=PROJECT))  # fmt: skip
        dispatcher.wake()
        return held, await until(queue, lambda c: c["delivered"] == 3)

    held, after = harness.run(body)
    assert (held["held"], held["failed"]) == (3, 0)  # not burned as failures
    assert after["delivered"] == 3
    assert len(harness.graph.received) == 2


def test_transient_failures_back_off_and_keep_the_event_id(harness):
    harness.graph.script.append(graph_error(500, 2, is_transient=True))

    async def body(queue: Outbox, dispatcher: Dispatcher) -> dict[str, int]:
        await queue.enqueue([new(1)])
        dispatcher.wake()
        await until(queue, lambda _: len(harness.graph.received) == 1)
        await asyncio.sleep(0.1)
        retrying = rows(queue)["e1"]
        assert (retrying.status, retrying.attempts) == ("queued", 1)
        assert retrying.next_at >= harness.clock() + 0.5  # equal jitter: at least half of 1 s
        assert orjson.loads(retrying.error or b"{}")["code"] == "UPSTREAM_UNAVAILABLE"
        harness.clock.now += 10
        dispatcher.wake()
        return await until(queue, lambda c: c["delivered"] == 1)

    assert harness.run(body)["delivered"] == 1
    first, second = harness.graph.bodies()
    assert first["data"][0]["event_id"] == second["data"][0]["event_id"] == "e1"


def test_throttling_opens_the_breaker_for_every_event_of_the_pixel(harness):
    harness.graph.script.append(graph_error(400, 80004))

    async def body(queue: Outbox, dispatcher: Dispatcher) -> int:
        await queue.enqueue([new(1)])
        dispatcher.wake()
        await until(queue, lambda _: len(harness.graph.received) == 1)
        harness.clock.now += 3  # past the event's own backoff, inside the breaker's 5 s
        await queue.enqueue([new(n) for n in range(2, 50)])
        dispatcher.wake()
        await asyncio.sleep(0.3)
        return len(harness.graph.received)

    assert harness.run(body) == 1


def test_events_past_metas_age_limit_fail_without_a_request(harness):
    async def body(queue: Outbox, dispatcher: Dispatcher) -> dict[str, int]:
        await queue.enqueue([new(1, event_time=int(NOW) - 8 * 86400)])
        dispatcher.wake()
        return await until(queue, lambda c: c["failed"] == 1)

    assert harness.run(body)["failed"] == 1
    assert harness.graph.received == []
    error = orjson.loads(rows(harness)["e1"].error or b"{}")
    assert error["code"] == "EVENT_EXPIRED"


def test_a_claim_whose_sender_died_is_sent_again_after_its_lease(harness):
    async def body(queue: Outbox, dispatcher: Dispatcher) -> dict[str, int]:
        await dispatcher.stop(timeout=1)  # a claim made by a process that then died
        await queue.enqueue([new(1)])
        now = harness.clock()
        await queue.write(lambda db: outbox.claim(db, now=now, lease_until=now + LEASE_SECONDS,
                                                  limit=10))  # fmt: skip
        harness.clock.now += LEASE_SECONDS + 1
        dispatcher = Dispatcher(queue, GraphClient(harness.config.graph, harness.graph.transport()),
                                Credentials(queue.database, keyring_of(harness.config.storage)),
                                harness.config,
                                clock=harness.clock)  # fmt: skip
        dispatcher.start()
        try:
            return await until(queue, lambda c: c["delivered"] == 1)
        finally:
            await dispatcher.stop(timeout=1)

    assert harness.run(body)["delivered"] == 1
    [sent] = harness.graph.bodies()
    assert sent["data"][0]["event_id"] == "e1"


def test_stop_releases_what_it_could_not_finish(harness):
    harness.graph.script.append(Step(delay=30))  # Meta hangs

    async def body(queue: Outbox, dispatcher: Dispatcher) -> outbox.EventStatus:
        await queue.enqueue([new(1)])
        dispatcher.wake()
        await until(queue, lambda _: len(harness.graph.received) == 1)
        started = time.monotonic()
        await dispatcher.stop(timeout=0.2)
        assert time.monotonic() - started < 10  # Meta hangs for 30 s: the sends were cut
        return rows(queue)["e1"]

    released = harness.run(body)
    assert released.status == "queued"
    assert released.next_at <= harness.clock()  # due now, not at the end of its lease


def test_a_refusal_of_a_user_credential_holds_its_events_and_marks_it_invalid(harness):
    store = open_credentials(harness.config.storage)
    (mine, _), (other, _) = (store.set(PROJECT, USER, f"EAAB-{n}") for n in ("mine", "other"))
    harness.graph.script.append(graph_error(400, 190, error_subcode=460))

    async def body(queue: Outbox, dispatcher: Dispatcher) -> dict[str, int]:
        await queue.enqueue([new(n, credential=mine.id) for n in range(2)])
        dispatcher.wake()
        await until(queue, lambda c: c["held"] == 2)
        await queue.enqueue([new(9, credential=other.id)])  # another account goes on
        dispatcher.wake()
        return await until(queue, lambda c: c["delivered"] == 1)

    counts = harness.run(body)
    assert (counts["held"], counts["delivered"]) == (2, 1)
    refused = store.by_id(PROJECT, mine.id)
    assert refused is not None and refused.status == "invalid"
    assert refused.status_error is not None
    assert refused.status_error["upstream"]["error_subcode"] == 460
    assert "EAAB" not in orjson.dumps(refused.status_error).decode()
    assert store.by_id(PROJECT, other.id).status == "valid"  # type: ignore[union-attr]
    assert [b["access_token"] for b in harness.graph.bodies()] == ["EAAB-mine", "EAAB-other"]
    store.close()


def test_a_refusal_of_a_token_replaced_meanwhile_holds_nothing(harness):
    """`credentials set` while a request with the old token is out: Meta's 190 for the old
    token does not hold the events; they go again with the new one."""
    store = open_credentials(harness.config.storage)
    credential, _ = store.set(PROJECT, USER, "EAAB-old-user-token")
    refusal = graph_error(400, 190)
    harness.graph.script.append(Step(refusal.status, error=refusal.error, delay=0.3))

    async def body(queue: Outbox, dispatcher: Dispatcher) -> dict[str, int]:
        await queue.enqueue([new(1, credential=credential.id)])
        dispatcher.wake()
        await until(queue, lambda _: len(harness.graph.received) == 1)
        # as the CLI would, meanwhile
        store.set(PROJECT, USER, "EAAB-new-user-token", credential_id=credential.id)
        return await until(queue, lambda c: c["delivered"] == 1)

    counts = harness.run(body)
    store.close()
    assert (counts["delivered"], counts["held"]) == (1, 0)
    first, second = harness.graph.bodies()
    assert (first["access_token"], second["access_token"]) == (
        "EAAB-old-user-token",
        "EAAB-new-user-token",
    )


def test_events_of_a_removed_credential_fail_and_others_go_on(harness):
    store = open_credentials(harness.config.storage)
    gone, _ = store.set(PROJECT, USER, "EAAB-gone")
    store.remove(PROJECT, gone.id)
    store.close()

    async def body(queue: Outbox, dispatcher: Dispatcher) -> dict[str, int]:
        await queue.enqueue([new(1, credential=gone.id), new(2)])
        dispatcher.wake()
        return await until(queue, lambda c: c["failed"] == 1 and c["delivered"] == 1)

    harness.run(body)
    assert [b["access_token"] for b in harness.graph.bodies()] == [TOKEN]  # the project's
    assert orjson.loads(rows(harness)["e1"].error or b"{}") == {
        "code": "INTEGRATION_NOT_ENABLED",
        "message": "The credential was removed.",
    }


def test_the_claims_of_a_long_send_are_renewed(harness, monkeypatch):
    """A send that outlasts its lease keeps its claim; a dead process's claims end within
    LEASE_SECONDS (previous test)."""
    monkeypatch.setattr(dispatcher_module, "RENEW_SECONDS", 0.05)
    harness.graph.script.append(Step(delay=1.0))  # Meta is slow

    async def body(queue: Outbox, dispatcher: Dispatcher) -> float:
        await queue.enqueue([new(1)])
        dispatcher.wake()
        await until(queue, lambda _: len(harness.graph.received) == 1)
        harness.clock.now += LEASE_SECONDS - 1  # the lease nearly over, the send still out
        await asyncio.sleep(0.3)
        return rows(queue)["e1"].next_at

    assert harness.run(body) >= NOW + 2 * LEASE_SECONDS - 1


def test_a_credentials_last_use_is_written_once_for_many_sends(harness):
    store = open_credentials(harness.config.storage)
    credential, _ = store.set(PROJECT, USER, "EAAB-used")
    assert credential.last_used_at is None

    async def body(queue: Outbox, dispatcher: Dispatcher) -> None:
        await queue.enqueue(
            [new(n, credential=credential.id, pixel=f"{PIXEL}{n}") for n in range(3)]
        )
        dispatcher.wake()
        counts = await until(queue, lambda c: c["delivered"] == 3)
        assert counts["delivered"] == 3, counts
        assert store.by_id(PROJECT, credential.id).last_used_at is None  # type: ignore[union-attr]
        await dispatcher.write_uses()  # what the loop does once a minute

    harness.run(body)
    used = store.by_id(PROJECT, credential.id)
    store.close()
    assert used is not None and used.last_used_at is not None
    assert abs(used.last_used_at - time.time()) < 60
    assert len(harness.graph.received) == 3  # three sends, one write


@pytest.mark.parametrize(
    ("failure", "waits"),
    [
        # No configured key opens the token (a key file changed): its events wait a minute
        # for the key, they do not fail.
        (SecretKeyError("a key that is not configured"), 60),
        # The database failed the lookup (PostgreSQL restarting): no reason to hold them a
        # minute as if their key were missing; the claim is let go, the lease makes them due.
        (StorageUnavailable(reading=True), LEASE_SECONDS),
    ],
    ids=["no-key-opens-it", "storage-failed"],
)
def test_a_token_that_cannot_be_had_keeps_its_events_queued_until_it_can(
    harness, monkeypatch, failure: Exception, waits: float
):
    store = open_credentials(harness.config.storage)
    credential, _ = store.set(PROJECT, USER, "EAAB-sealed")
    store.close()
    real = Credentials.token_of
    broken = {"now": True}

    async def token_of(self: Credentials, project: Any, credential_id: str | None) -> str | None:
        if broken["now"] and credential_id == credential.id:
            raise failure
        return await real(self, project, credential_id)

    monkeypatch.setattr(Credentials, "token_of", token_of)

    async def body(queue: Outbox, dispatcher: Dispatcher) -> dict[str, int]:
        await queue.enqueue([new(1, credential=credential.id)])
        dispatcher.wake()
        await asyncio.sleep(0.5)
        waiting = rows(queue)["e1"]
        assert (waiting.status, waiting.attempts, waiting.next_at) == ("queued", 0, NOW + waits)
        broken["now"] = False  # the key, or the database, is back
        harness.clock.now += waits + 1
        dispatcher.wake()
        return await until(queue, lambda c: c["delivered"] == 1)

    assert harness.run(body)["delivered"] == 1
    assert [b["access_token"] for b in harness.graph.bodies()] == ["EAAB-sealed"]
