"""Concurrent deliveries to the same pixel with the same credentials share one Graph request.

Calls that reach delivery in the same event-loop turn are gathered and sent together (up to
Meta's 1,000 events per request): no timer, so a call on a quiet server waits for nothing,
while a busy one makes a request per group instead of per call (the outbound request is the
largest cost of a call: BENCHMARKS.md). Every caller still gets its own answer.

Meta accepts or refuses a request whole, so a refused group is resent one delivery at a time:
one caller's bad event never fails another's. So is a group whose request failed in any way
that is not Meta's answer. Each caller's events were serialised in its own call (graph.py's
Delivery), so nothing one caller sent can fail the shared request. Credential and
availability failures concern every event alike and reach every caller of the group.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import defaultdict
from typing import Any

from server.delivery.graph import MAX_EVENTS_PER_REQUEST, Delivery, GraphClient
from server.errors import UpstreamError, UpstreamRejected
from server.logs import log, request_id_var, set_request_id

# Deliveries that may share a request: same project, pixel, credentials and test code.
_Key = tuple[str, str, str, str | None, str | None]
# A delivery, its caller's future, its caller's request id (for the lines of a lone send) and
# when its caller's budget ends (time.monotonic()).
_Waiting = tuple[Delivery, "asyncio.Future[dict[str, Any]]", str | None, float]


class Coalescer:
    def __init__(self, graph: GraphClient) -> None:
        self._graph = graph
        self._waiting: defaultdict[_Key, list[_Waiting]] = defaultdict(list)
        self._tasks: set[asyncio.Task[None]] = set()

    def attempt_timeout(self) -> float:
        return self._graph.attempt_timeout()

    def submit(
        self, delivery: Delivery, *, project_id: str, budget: float
    ) -> asyncio.Future[dict[str, Any]]:
        """Meta's answer for this delivery's own events, or GraphClient.send's error."""
        loop = asyncio.get_running_loop()
        if not self._waiting:
            # A shared request belongs to no one caller: its lines carry no request id.
            loop.call_soon(self._dispatch, context=contextvars.Context())
        batch = delivery.batch
        key = (
            project_id,
            batch.pixel_id,
            delivery.access_token,
            delivery.app_secret,
            batch.test_event_code,
        )
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        deadline = time.monotonic() + budget
        self._waiting[key].append((delivery, future, request_id_var.get(), deadline))
        return future

    def _dispatch(self) -> None:
        waiting, self._waiting = self._waiting, defaultdict(list)
        for key, group in waiting.items():
            for chunk in _chunks(group):
                task = asyncio.ensure_future(self._deliver(key[0], chunk))
                self._tasks.add(task)  # held until done: the loop keeps only weak references
                task.add_done_callback(self._tasks.discard)

    async def _deliver(self, project_id: str, group: list[_Waiting]) -> None:
        live = [waiting for waiting in group if not waiting[1].done()]  # a caller may be gone
        if len(live) == 1:
            await self._alone(project_id, *live[0])
        elif live:
            await self._together(project_id, live)

    async def _alone(
        self,
        project_id: str,
        delivery: Delivery,
        future: asyncio.Future[dict[str, Any]],
        request_id: str | None,
        deadline: float,
    ) -> None:
        set_request_id(request_id)  # this task's own context: the caller's id on its lines
        try:
            answer = await self._graph.send(
                delivery, project_id=project_id, budget=deadline - time.monotonic()
            )
        except Exception as exc:  # every failure belongs to its caller
            _settle(future, exc)
        else:
            _settle(future, answer)

    async def _together(self, project_id: str, group: list[_Waiting]) -> None:
        try:
            combined = Delivery.combined([delivery for delivery, _, _, _ in group])
            # The group waits as long as its most patient caller; the others are answered
            # at their own deadline (runner.py), their events queued if Meta is that slow.
            budget = max(deadline for *_, deadline in group) - time.monotonic()
            answer = await self._graph.send(combined, project_id=project_id, budget=budget)
        except UpstreamRejected:
            log("graph_group_refused", project=project_id, calls=len(group))
            await self._each_alone(project_id, group)
        except UpstreamError as exc:
            # Credentials and availability concern every event of the group alike.
            for delivery, future, _, _ in group:
                _settle(future, exc.for_caller(delivery.batch.event_ids))
        except Exception as exc:  # not Meta's verdict: no caller pays for sharing
            log("graph_group_failed", logging.ERROR, project=project_id, calls=len(group),
                error=type(exc).__name__)  # fmt: skip
            await self._each_alone(project_id, group)
        else:
            for delivery, future, _, _ in group:
                _settle(future, {**answer, "events_received": len(delivery.batch.events)})

    async def _each_alone(self, project_id: str, group: list[_Waiting]) -> None:
        await asyncio.gather(*(self._alone(project_id, *waiting) for waiting in group))


def _chunks(group: list[_Waiting]) -> list[list[_Waiting]]:
    """Consecutive runs of deliveries holding at most MAX_EVENTS_PER_REQUEST events."""
    chunks: list[list[_Waiting]] = [[]]
    count = 0
    for item in group:
        size = len(item[0].batch.events)
        if chunks[-1] and count + size > MAX_EVENTS_PER_REQUEST:
            chunks.append([])
            count = 0
        chunks[-1].append(item)
        count += size
    return chunks


def _settle(future: asyncio.Future[dict[str, Any]], outcome: dict[str, Any] | Exception) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
