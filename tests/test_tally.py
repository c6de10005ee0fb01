"""The console's per-minute counters: counted as events change state, added every few seconds,
read back by minute, pixel, match key, action source and failure code."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.testclient import TestClient

from server import tally as tally_module
from server.storage import minutes
from server.storage.minutes import Coverage, MinuteCounts
from server.storage.outbox import Outbox
from server.tally import Latencies, Tally
from tests.support import NOW, PIXEL, PROJECT, funnel_parameters, graph_error
from tools.base import EventBatch

MINUTE = int(NOW) // 60 * 60
IP_UA = {"client_ip_address": "203.0.113.7", "client_user_agent": "Mozilla/5.0"}


def event(name: str, source: str = "website", **user_data: Any) -> dict[str, Any]:
    return {"event_name": name, "action_source": source, "user_data": user_data}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def counted(tmp_path: Path, work: Callable[[Tally, Clock], None]) -> Outbox:
    """An outbox whose minutes hold what `work` counted (flushed once at the end)."""
    queue = Outbox(tmp_path / "funnelgate.db", clock=lambda: NOW)
    clock = Clock()
    tally = Tally(queue, clock=clock)
    work(tally, clock)
    asyncio.run(tally.flush())
    return queue


def test_coverage_counts_each_key_and_the_events_with_only_an_ip_and_a_user_agent(tmp_path):
    batch = EventBatch(PIXEL, [
        event("Purchase", em=["h"], ph=["h"], **IP_UA),
        event("Purchase", **IP_UA),
        event("Purchase", **IP_UA),
        event("Purchase", external_id=["h"], fbc="fb.1.2.3", fn=["h"]),
        event("Lead", "email", fbp="fb.1.2.4"),
        {"event_name": "Lead", "action_source": "email"},
    ])  # fmt: skip
    queue = counted(tmp_path, lambda tally, _: tally.accepted(PROJECT, batch))

    found = queue.read_now(lambda db: minutes.coverage(db, MINUTE, PROJECT, PIXEL))
    assert found == [
        Coverage("Purchase", total=4, em=1, ph=1, external_id=1, fbc=1, fbp=0, ip_ua=3,
                 only_ip_ua=2, other_keys=1, none=0),
        Coverage("Lead", total=2, em=0, ph=0, external_id=0, fbc=0, fbp=1, ip_ua=0,
                 only_ip_ua=0, other_keys=0, none=1),
        Coverage("*", total=6, em=1, ph=1, external_id=1, fbc=1, fbp=1, ip_ua=3, only_ip_ua=2,
                 other_keys=1, none=1),
    ]  # fmt: skip
    assert queue.read_now(lambda db: minutes.sources(db, MINUTE, PROJECT, PIXEL)) == [
        ("Purchase", "website", 4),
        ("Lead", "email", 2),
    ]
    assert queue.read_now(lambda db: minutes.coverage(db, MINUTE, PROJECT, "other-pixel")) == []


def test_outcomes_go_to_their_minute_and_add_up_across_flushes(tmp_path):
    def work(tally: Tally, clock: Clock) -> None:
        tally.accepted(PROJECT, EventBatch(PIXEL, [event("Lead"), event("Lead")]))
        tally.delivered(PROJECT, PIXEL, ["Lead"])
        tally.retried(PROJECT, PIXEL, 1)
        clock.now += 60
        tally.delivered(PROJECT, PIXEL, ["Lead"])
        tally.failed(PROJECT, "222", ["Purchase", "Purchase"], "UPSTREAM_REJECTED")
        tally.failed(PROJECT, PIXEL, ["Lead"], "EVENT_EXPIRED")

    queue = counted(tmp_path, work)
    again = Tally(queue, clock=lambda: NOW + 60)
    again.delivered(PROJECT, PIXEL, ["Lead"])
    asyncio.run(again.flush())

    assert queue.read_now(lambda db: minutes.series(db, MINUTE, MINUTE + 3600)) == [
        MinuteCounts(MINUTE, accepted=2, delivered=1, failed=0, retried=1),
        MinuteCounts(MINUTE + 60, accepted=0, delivered=2, failed=3, retried=0),
    ]
    one_pixel = queue.read_now(lambda db: minutes.series(db, MINUTE, MINUTE + 3600, PROJECT, "222"))
    assert one_pixel == [MinuteCounts(MINUTE + 60, 0, 0, 2, 0)]
    assert queue.read_now(lambda db: minutes.failure_codes(db, MINUTE)) == [
        ("UPSTREAM_REJECTED", 2),
        ("EVENT_EXPIRED", 1),
    ]
    assert queue.read_now(lambda db: minutes.failure_codes(db, MINUTE, PROJECT, PIXEL)) == [
        ("EVENT_EXPIRED", 1)
    ]
    assert [p[:2] for p in queue.read_now(lambda db: minutes.pixels(db, MINUTE))] == [
        (PROJECT, PIXEL),
        (PROJECT, "222"),
    ]
    # minute 1: two event rows (Lead, and the retries) and one source row
    assert queue.read_now(lambda db: minutes.prune(db, before=MINUTE + 60)) == 3
    assert [m.minute for m in queue.read_now(lambda db: minutes.series(db, 0, MINUTE + 3600))] == [
        MINUTE + 60
    ]


def test_callers_names_and_pixels_cannot_grow_the_counts_without_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(tally_module, "MAX_ROWS", 10)
    names = [event(f"Custom{n}") for n in range(25)]
    queue = counted(tmp_path, lambda tally, _: tally.accepted(PROJECT, EventBatch(PIXEL, names)))
    found = queue.read_now(lambda db: minutes.pixels(db, MINUTE))
    assert sum(p.accepted for p in found) == 25  # nothing lost, only folded
    rows = queue.read_now(lambda db: db.execute("SELECT count(*) FROM minute_events").fetchone()[0])
    assert rows == 11  # 10, then one row for the rest of the project's minute


def test_graph_latency_quantiles_come_from_a_bounded_window():
    latencies = Latencies(window=100)
    assert latencies.quantiles() == (None, None)
    for ms in range(1, 1001):  # only the last 100 count: 901..1000 ms
        latencies.graph_request("delivered", ms / 1000)
    p50, p99 = latencies.quantiles()
    assert p50 == pytest.approx(0.951, abs=0.002)
    assert p99 == pytest.approx(0.999, abs=0.002)


def test_a_running_server_counts_its_calls(make_client, graph, sign):
    client: TestClient = make_client()
    graph.script.append(graph_error(400, 100))

    def call(**overrides: Any) -> httpx2.Response:
        return client.post(f"/projects/{PROJECT}/tools", json={
            "tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": funnel_parameters(**overrides)
        }, headers={"Authorization": f"Bearer {sign()}"})  # fmt: skip

    assert call(eventId="refused").status_code == 400
    assert call(eventId="a").status_code == 200
    assert call(eventId="b", customerEmail=None).status_code == 200
    state = client.app.state  # type: ignore[attr-defined]
    assert client.portal is not None
    client.portal.call(state.tally.flush)  # what the server does every 5 s

    outbox: Outbox = state.outbox
    [counts] = outbox.read_now(lambda db: minutes.series(db, 0, 2**40))
    assert counts[1:] == (3, 2, 1, 0)
    [purchases, _] = outbox.read_now(lambda db: minutes.coverage(db, 0, PROJECT, PIXEL))
    assert (purchases.total, purchases.em, purchases.ip_ua) == (3, 2, 3)
    assert outbox.read_now(lambda db: minutes.failure_codes(db, 0)) == [("UPSTREAM_REJECTED", 1)]
    p50, p99 = state.graph_latency.quantiles()
    assert p50 is not None and p99 is not None and p50 <= p99
