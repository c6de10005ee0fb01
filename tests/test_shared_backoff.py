"""Throttling backoff shared through the database: what one instance's breaker opens, another
instance holds too (delivery/shared_backoff.py), on both backends."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

from server.delivery.shared_backoff import SharedBackoff
from server.delivery.throttle import THROTTLED_SECONDS, Breakers
from server.storage import breakers as table
from server.storage.database import open_database
from server.storage.outbox import Outbox
from server.storage.schema import upgrade_schema
from tests.support import make_config

KEY = ("EAAB-token", "123456789012345")
OTHER = ("EAAB-token", "999")


def test_a_breaker_one_instance_opens_holds_the_others_until_its_end(
    backend, tmp_path: Path, rsa_key
):
    now = [1_800_000_000.0]
    config = make_config(tmp_path, rsa_key, database_url=backend)
    upgrade_schema(config.storage)

    def instance() -> tuple[Breakers, Outbox, SharedBackoff]:
        breakers = Breakers(clock=lambda: now[0], rand=lambda: 0.0)
        queue = Outbox(
            open_database(config.storage.database_path, config.storage.url), clock=lambda: now[0]
        )
        return breakers, queue, SharedBackoff(breakers, queue, clock=lambda: now[0])

    async def scenario() -> None:
        (a, queue_a, share_a), (b, queue_b, share_b) = instance(), instance()
        try:
            a.failed(KEY, throttled=True)  # Meta throttled instance A
            assert not a.allow(KEY) and b.allow(KEY)
            await share_a.share()
            await share_b.share()
            assert not b.allow(KEY), "B holds the pixel A found throttled"
            assert b.allow(OTHER), "another pixel is not held"
            assert b.open_until(KEY) == now[0] + THROTTLED_SECONDS
            stored = await queue_b.read(lambda db: table.open_now(db, now[0]))
            assert [(pixel, failures) for _, pixel, _, failures in stored] == [(KEY[1], 1)]
            assert all("EAAB" not in key for key, *_ in stored)  # a digest, never the token

            now[0] += THROTTLED_SECONDS + 1  # the interval ends: each may probe once
            assert b.allow(KEY) and not b.allow(KEY)
            b.succeeded(KEY)  # B's probe went through: the shared row goes
            await share_b.share()
            assert await queue_a.read(lambda db: table.open_now(db, now[0] - 60)) == []
        finally:
            queue_a.close()
            queue_b.close()

    asyncio.run(scenario())


def test_changes_wait_while_the_database_is_down_and_are_shared_after(tmp_path: Path):
    breakers = Breakers(clock=lambda: 1_800_000_000.0, rand=lambda: 0.0)
    breakers.failed(KEY, throttled=True)
    changes = breakers.taken_changes()
    assert len(changes) == 1 and breakers.taken_changes() == []
    breakers.requeue(changes)  # the write failed
    assert breakers.taken_changes() == changes
    breakers.requeue(changes * 2000)
    assert len(breakers.taken_changes()) == 1000  # bounded: the newest are kept


def test_instances_sharing_at_once_never_deadlock(postgres_url: str, tmp_path: Path, rsa_key):
    """Two instances write the same breakers in opposite orders at once, many times: rows are
    taken in key order, so one waits for the other (PostgreSQL would otherwise abort one with
    a deadlock and its changes would wait a second for the next share)."""
    config = make_config(tmp_path, rsa_key, database_url=postgres_url)
    upgrade_schema(config.storage)
    changes = [(f"{i:064x}", "123", 1_900_000_000.0 + i, 1) for i in range(200)]

    async def scenario() -> None:
        queues = [
            Outbox(open_database(config.storage.database_path, postgres_url), clock=lambda: 0.0)
            for _ in range(2)
        ]
        try:
            for round_ in range(10):
                ordered = [(key, pixel, until + round_, 1) for key, pixel, until, _ in changes]
                await asyncio.gather(
                    queues[0].write(partial(table.share, changes=ordered)),
                    queues[1].write(partial(table.share, changes=ordered[::-1])),
                )
            found = await queues[0].read(lambda db: table.open_now(db, 0.0))
            assert len(found) == 200 and {until for _, _, until, _ in found} == {
                c[2] + 9 for c in changes
            }
        finally:
            for queue in queues:
                queue.close()

    asyncio.run(scenario())


def test_a_key_closed_then_opened_again_within_one_share_stays_open(backend, tmp_path, rsa_key):
    """Meta flapping: a probe went through, then the next request was throttled again, all
    within one second; the last change is the one the others must see."""
    config = make_config(tmp_path, rsa_key, database_url=backend)
    upgrade_schema(config.storage)
    database = open_database(config.storage.database_path, config.storage.url)
    database.start_writer()
    key = "a" * 64
    changes = [(key, "123", 100.0, 1), (key, "123", 0.0, 0), (key, "123", 111.0, 2)]

    async def scenario() -> list[tuple[str, str, float, int]]:
        await database.submit(lambda db: table.share(db, changes))
        return await database.read(lambda db: table.open_now(db, 0.0))

    try:
        assert asyncio.run(scenario()) == [(key, "123", 111.0, 2)]
    finally:
        database.close()
