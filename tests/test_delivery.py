"""The Graph client's waits between attempts: exponential, fully jittered, capped at 2 s
(README, Delivery and retries)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from server.config import GraphSettings
from server.delivery.graph import Delivery, GraphClient
from server.delivery.policy import backoff_seconds
from tests.support import NOW, PIXEL, FakeGraph, graph_error
from tools.base import EventBatch

EVENT = {"event_name": "Lead", "event_time": int(NOW), "action_source": "chat",
         "event_id": "e-1", "user_data": {"external_id": ["0" * 64]}}  # fmt: skip


def waits(graph: FakeGraph, rand: Callable[[], float]) -> list[float]:
    """The delays the client asked to sleep for while delivering one event to `graph`."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def go() -> None:
        settings = GraphSettings(base_url="https://graph.test", retry_deadline_seconds=60)
        client = GraphClient(settings, graph.transport(), sleep=sleep, rand=rand)
        try:
            await client.send(Delivery(EventBatch(PIXEL, [EVENT]), "EAAB-1"), project_id="p1")
        finally:
            await client.aclose()

    asyncio.run(go())
    return slept


def test_waits_double_from_200_ms_up_to_the_2_s_cap():
    graph = FakeGraph()
    graph.script.extend([graph_error(503, 2, is_transient=True)] * 7)
    assert waits(graph, rand=lambda: 1.0) == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert len(graph.received) == 8  # the eighth attempt is delivered


@pytest.mark.parametrize("attempt", [1, 4, 5, 30])
def test_the_jitter_draws_below_the_capped_exponential(attempt):
    ceiling = min(2.0, 0.2 * 2 ** (attempt - 1))
    assert backoff_seconds(attempt, rand=lambda: 0.0) == 0.0
    assert backoff_seconds(attempt, rand=lambda: 0.5) == pytest.approx(ceiling / 2)
