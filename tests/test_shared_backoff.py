"""Throttling backoff shared through the database: what one instance's breaker opens, another
instance holds too (delivery/shared_backoff.py), on both backends."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

from server.delivery.shared_backoff import SharedBackoff
from server.delivery.throttle import PROBE_GRACE_SECONDS, THROTTLED_SECONDS, Breakers, Shared
from server.storage import breakers as table
from server.storage.database import open_database
from server.storage.outbox import Outbox
from server.storage.schema import upgrade_schema
from tests.support import make_config

KEY = ("EAAB-token", "123456789012345")
OTHER = ("EAAB-token", "999")


class Instances:
    """Instances on one database (each its breakers, outbox and sharing), on one clock."""

    def __init__(self, storage_url: str | None, tmp_path: Path, rsa_key: Any) -> None:
        self.now = 1_800_000_000.0
        self.config = make_config(tmp_path, rsa_key, database_url=storage_url)
        upgrade_schema(self.config.storage)
        self.queues: list[Outbox] = []

    def new(self) -> tuple[Breakers, SharedBackoff]:
        breakers = Breakers(clock=lambda: self.now, rand=lambda: 0.0)
        storage = self.config.storage
        queue = Outbox(open_database(storage.database_path, storage.url), clock=lambda: self.now)
        self.queues.append(queue)
        return breakers, SharedBackoff(breakers, queue, clock=lambda: self.now)

    async def rows(self) -> list[Any]:
        return await self.queues[0].read(lambda db: table.recent(db, self.now))

    def close(self) -> None:
        for queue in self.queues:
            queue.close()


def test_one_instance_probes_a_shared_interval_and_its_outcome_holds_everywhere(
    backend, tmp_path: Path, rsa_key
):
    instances = Instances(backend, tmp_path, rsa_key)

    async def scenario() -> None:
        (a, share_a), (b, share_b), (c, share_c) = (instances.new() for _ in range(3))
        a.failed(KEY, throttled=True)  # Meta throttled instance A
        assert not a.allow(KEY) and b.allow(KEY)
        for share in (share_a, share_b, share_c):
            await share.share()
        assert not b.allow(KEY) and not c.allow(KEY), "B and C hold the pixel A found throttled"
        assert b.allow(OTHER), "another pixel is not held"
        [(key, pixel, until, failures, owner)] = await instances.rows()
        assert "EAAB" not in key and (pixel, failures, owner) == (KEY[1], 1, a.instance)
        assert until == instances.now + THROTTLED_SECONDS

        instances.now += THROTTLED_SECONDS + 1  # the interval ends: A probes, B and C wait
        assert a.allow(KEY)
        assert not b.allow(KEY) and not c.allow(KEY)
        a.failed(KEY, throttled=True)  # still throttled: the next, longer interval
        await share_a.share()
        await share_b.share()
        assert b.open_until(KEY) > instances.now + THROTTLED_SECONDS + PROBE_GRACE_SECONDS

        instances.now = b.open_until(KEY) - PROBE_GRACE_SECONDS + 0.5
        assert a.allow(KEY) and not b.allow(KEY)  # A probes again, alone
        a.succeeded(KEY)  # Meta answers: A closes it, and so does everyone at their next share
        await share_a.share()
        await share_b.share()
        await share_c.share()
        assert b.allow(KEY) and c.allow(KEY)
        assert await instances.rows() == []

    try:
        asyncio.run(scenario())
    finally:
        instances.close()


def test_when_the_opener_goes_quiet_the_others_probe_after_the_grace(
    backend, tmp_path: Path, rsa_key
):
    instances = Instances(backend, tmp_path, rsa_key)

    async def scenario() -> None:
        (a, share_a), (b, share_b) = instances.new(), instances.new()
        a.failed(KEY, throttled=True)
        await share_a.share()
        await share_b.share()  # then A dies: its probe never comes
        instances.now += THROTTLED_SECONDS + 1
        await share_b.share()
        assert not b.allow(KEY), "within the grace, A's probe may still come"
        instances.now += PROBE_GRACE_SECONDS
        await share_b.share()
        assert b.allow(KEY) and not b.allow(KEY)  # B probes, once
        b.succeeded(KEY)
        await share_b.share()
        assert await instances.rows() == []

    try:
        asyncio.run(scenario())
    finally:
        instances.close()


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
                    queues[0].write(partial(table.share, changes=ordered, owner="a")),
                    queues[1].write(partial(table.share, changes=ordered[::-1], owner="b")),
                )
            found = await queues[0].read(lambda db: table.recent(db, 0.0))
            assert len(found) == 200 and {until for _, _, until, _, _ in found} == {
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

    async def scenario() -> list[Shared]:
        await database.submit(lambda db: table.share(db, changes, "me"))
        return await database.read(lambda db: table.recent(db, 0.0))

    try:
        assert asyncio.run(scenario()) == [(key, "123", 111.0, 2, "me")]
    finally:
        database.close()
