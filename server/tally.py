"""The console's numbers, counted as events change state (observe.py), in memory, and added
to the per-minute counters (storage/minutes.py) every few seconds through the outbox's
writer: no call waits on a count, and no page scans the outbox for one.

A count not yet written when the process dies is lost (at most FLUSH_SECONDS of them): they
are statistics, the events themselves are in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

from server.logs import log
from server.observe import Listener
from server.storage import minutes
from server.storage.minutes import EVENT_COLUMNS, EventKey, FailureKey, SourceKey
from server.storage.outbox import Outbox
from tools.base import EventBatch

FLUSH_SECONDS = 5.0
# Distinct (minute, project, pixel, event name) rows one flush may hold: pixels and event
# names are the caller's, so past it counts fold into (minute, project, OTHER_NAME, OTHER_NAME)
# rather than memory growing without bound.
MAX_ROWS = 10_000
OTHER_NAME = "(other)"
LATENCY_WINDOW = 2048  # the Graph requests p50 and p99 are read over

_AT = {column: i for i, column in enumerate(EVENT_COLUMNS)}
_ACCEPTED, _DELIVERED, _FAILED, _RETRIED = (_AT[c] for c in minutes.COUNTS)
_KEYS = tuple((key, _AT[key]) for key in minutes.KEYS)
_IP, _UA = "client_ip_address", "client_user_agent"
_OWN_COLUMN = {*minutes.KEYS, _IP, _UA}


class Tally(Listener):
    def __init__(self, queue: Outbox, *, clock: Callable[[], float] = time.time) -> None:
        self._queue = queue
        self._clock = clock
        self._events: dict[EventKey, list[int]] = {}
        self._sources: dict[SourceKey, int] = {}
        self._failures: dict[FailureKey, int] = {}
        self._task: asyncio.Task[None] | None = None

    def _minute(self) -> int:
        return int(self._clock()) // 60 * 60

    def _row(self, minute: int, project_id: str, pixel_id: str, name: str) -> list[int]:
        key = (minute, project_id, pixel_id, name)
        row = self._events.get(key)
        if row is None:
            if len(self._events) >= MAX_ROWS:  # past the bound: one row per project and minute
                key = (minute, project_id, OTHER_NAME, OTHER_NAME)
                row = self._events.get(key)
            if row is None:
                row = self._events[key] = [0] * len(EVENT_COLUMNS)
        return row

    def accepted(self, project_id: str, batch: EventBatch) -> None:
        minute = self._minute()  # one clock read per call, not per event
        for event in batch.events:
            name = str(event.get("event_name", ""))
            row = self._row(minute, project_id, batch.pixel_id, name)
            row[_ACCEPTED] += 1
            keys = event.get("user_data") or {}
            for key, at in _KEYS:
                if key in keys:
                    row[at] += 1
            if _IP in keys and _UA in keys:
                row[_AT["ip_ua"]] += 1
                if len(keys) == 2:
                    row[_AT["only_ip_ua"]] += 1
            if not keys:
                row[_AT["none"]] += 1
            elif any(key not in _OWN_COLUMN for key in keys):
                row[_AT["other_keys"]] += 1
            source = event.get("action_source")
            if isinstance(source, str) and len(self._sources) < MAX_ROWS:
                counted = (minute, project_id, batch.pixel_id, name, source)
                self._sources[counted] = self._sources.get(counted, 0) + 1

    def delivered(self, project_id: str, pixel_id: str, names: Sequence[str]) -> None:
        minute = self._minute()
        for name in names:
            self._row(minute, project_id, pixel_id, name)[_DELIVERED] += 1

    def failed(self, project_id: str, pixel_id: str, names: Sequence[str], code: str) -> None:
        minute = self._minute()
        for name in names:
            self._row(minute, project_id, pixel_id, name)[_FAILED] += 1
        key = (minute, project_id, pixel_id, code)
        self._failures[key] = self._failures.get(key, 0) + len(names)

    def retried(self, project_id: str, pixel_id: str, count: int) -> None:
        self._row(self._minute(), project_id, pixel_id, "")[_RETRIED] += count

    async def flush(self) -> None:
        """Adds what was counted since the last flush to the per-minute counters."""
        if not (self._events or self._sources or self._failures):
            return
        events, sources, failures = self._events, self._sources, self._failures
        self._events, self._sources, self._failures = {}, {}, {}
        await self._queue.write(lambda db: minutes.add(db, events, sources, failures))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):  # the last few seconds' counts, if the disk lets us
            await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception as exc:  # counts of this window are lost; the events are not
                log("tally_flush_failed", logging.ERROR, error=type(exc).__name__)


class Latencies(Listener):
    """The latest Graph requests' latencies, for the console's p50 and p99."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self._seconds: deque[float] = deque(maxlen=window)

    def graph_request(self, verdict: str, seconds: float) -> None:
        self._seconds.append(seconds)

    def quantiles(self) -> tuple[float | None, float | None]:
        """(p50, p99) in seconds over the window; None before any request."""
        if not self._seconds:
            return None, None
        ordered = sorted(self._seconds)
        last = len(ordered) - 1
        return ordered[round(last * 0.5)], ordered[round(last * 0.99)]
