"""Throttling backoff shared by the instances on one database: each second, the breakers this
instance opened or closed are written, and those the others opened are read back and merged
(throttle.py). One transaction a second, through the outbox's writer; none while no breaker
changes and none is open but for the read.

Meta asks callers that are throttled to slow down
(https://developers.facebook.com/docs/graph-api/overview/rate-limiting): ten instances each
probing every second would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from server.delivery.throttle import Breakers
from server.logs import log
from server.storage import breakers as table
from server.storage.outbox import Outbox

SHARE_EVERY_SECONDS = 1.0


class SharedBackoff:
    def __init__(self, breakers: Breakers, queue: Outbox, *, clock: Callable[[], float]) -> None:
        self._breakers = breakers
        self._queue = queue
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="funnelgate-shared-backoff")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # the database may be gone: nothing to lose
            await self.share()

    async def share(self) -> None:
        """Writes this instance's changes, then merges what is open anywhere."""
        changes = self._breakers.taken_changes()
        if changes:
            try:
                owner = self._breakers.instance
                await self._queue.write(lambda db: table.share(db, changes, owner))
            except BaseException:
                self._breakers.requeue(changes)
                raise
        now = self._clock()
        self._breakers.merge(await self._queue.read(lambda db: table.recent(db, now)))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SHARE_EVERY_SECONDS)
            try:
                await self.share()
            except Exception as exc:  # the database is down: backoff stays local meanwhile
                log("backoff_share_failed", logging.WARNING, error=type(exc).__name__)
