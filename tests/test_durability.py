"""Durable delivery under faults: real `funnelgate serve` processes on a real SQLite file, the
fault Graph (tests/faultgraph.py) as its own process on loopback, httpx as the callers.

Each test starts its own fault Graph and servers and stops them all, even when it fails; every
wait is bounded. The guarantees under test are the README's (Delivery): an event answered 202
or 200 reaches Meta whatever Meta or the host does, about once, and Meta is not hammered while
it throttles.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faultgraph import FaultGraph
from tests.gates import (
    PIXELS,
    PROJECT,
    Gate,
    Outcome,
    accepted_ids,
    assert_delivered,
    batch_call,
    post_all,
    post_all_async,
    single_call,
    stop_all,
    wait_until,
)
from tests.support import rsa_private_key, sign_token

pytestmark = pytest.mark.timeout(120)

# README, Delivery: while Meta throttles, one request per (token, pixel) per breaker interval;
# the interval starts at no less than this (5 s: "a throttled one at most one per 5 s") and
# doubles with each failed probe.
THROTTLED_INTERVAL_SECONDS = 5.0
USER = "user-1"


@pytest.fixture(scope="module")
def key() -> Any:
    return rsa_private_key()


@pytest.fixture(scope="module")
def token(key: Any) -> str:
    return sign_token(key, USER, now=time.time(), ttl=3600, aud=f"useparagon.com/{PROJECT}")


@pytest.fixture
def graph() -> Iterator[FaultGraph]:
    with FaultGraph() as fault_graph:
        yield fault_graph


@pytest.fixture
def gates(tmp_path: Path, key: Any, graph: FaultGraph) -> Iterator[Callable[..., Gate]]:
    """Makes Gates on this test's fault Graph; stops every one of them at teardown."""
    made: list[Gate] = []

    def make(**settings: Any) -> Gate:
        gate = Gate(tmp_path / f"gate{len(made)}", key, graph, **settings)
        made.append(gate)
        return gate

    try:
        yield make
    finally:
        stop_all(made)


# kill -9


def test_kill_9_during_a_queued_run_loses_no_accepted_event(gates, graph, token):
    """≥ 20,000 events in calls of 1,000 with a slow Meta, so a backlog exists; kill -9 while
    calls are in flight; a restart on the same database delivers every event answered 202."""
    graph.control(latency=[0.5, 0.5])
    gate = gates(delivery={"mode": "queued", "max_concurrent_requests": 2})
    gate.start()
    calls = []
    for c in range(26):
        ids = [f"k9-{c}-{i}" for i in range(1000)]
        calls.append((ids, batch_call(ids)))
    answered: list[Outcome] = []
    at_kill: dict[str, int] = {}

    def kill_at_20000(outcome: Outcome) -> None:
        answered.append(outcome)
        accepted_so_far = len(accepted_ids(answered))
        if not at_kill and accepted_so_far >= 20_000:
            gate.kill()  # calls are still in flight on the other connections
            at_kill.update(accepted=accepted_so_far, at_meta=graph.stats()["distinct_accepted"])

    outcomes = post_all(gate.base, token, calls, concurrency=4, after=kill_at_20000)
    assert {o.status for o in outcomes} <= {202, None}, [o.body for o in outcomes if o.status]
    accepted = accepted_ids(outcomes)
    assert at_kill, "the server was not killed during the run"
    assert len(accepted) >= 20_000
    assert None in {o.status for o in outcomes}, "no call was in flight at the kill"
    assert at_kill["at_meta"] < at_kill["accepted"], f"no backlog at the kill: {at_kill}"

    gate.start()  # the same config and database
    assert_delivered(graph, gate, accepted, seconds=30)


# A slow and failing Meta


@pytest.mark.parametrize(
    ("mode", "faults"),
    [
        pytest.param("sync", {"latency": [1.5, 3.0]}, id="sync-meta-at-1.5-3s"),
        pytest.param("queued", {"latency": [1.5, 3.0], "fail_rate": 0.3}, id="queued-both"),
    ],
)
def test_slow_and_failing_meta_gets_every_event_about_once(gates, graph, token, mode, faults):
    """Every call is answered 200 or 202, every event reaches Meta, and Meta accepts each
    about once: a slow answer is waited for, not cut and resent."""
    graph.control(**faults)
    gate = gates(delivery={"mode": mode})
    gate.start()
    calls = [([f"slow-{n}"], single_call(f"slow-{n}")) for n in range(200)]
    outcomes = post_all(gate.base, token, calls, concurrency=64, spacing=0.015)
    statuses = {o.status for o in outcomes}
    assert statuses <= {200, 202}, [
        (o.status, o.body) for o in outcomes if o.status not in (200, 202)
    ][:3]
    assert max(o.seconds for o in outcomes) < 10, "a caller's 10 s timeout was passed"
    ids = accepted_ids(outcomes)
    assert len(ids) == 200
    assert_delivered(graph, gate, ids, seconds=60)
    queued = [e for o in outcomes if o.status == 202 for e in o.event_ids]
    # Copies are final once funnelgate holds nothing more to send and Meta nothing in flight.
    settled = wait_until(
        lambda: (
            all(gate.event(token, e)["status"] == "delivered" for e in queued)
            and graph.stats()["in_flight"] == 0
        ),
        seconds=30,
    )
    assert settled, gate.outbox_rows(queued)
    copies = graph.copies()
    per_event = sum(copies[e] for e in ids) / len(ids)
    assert per_event <= 1.1, (
        f"Meta accepted each event {per_event:.2f} times on average "
        f"(most: {max(copies[e] for e in ids)}); Graph: {graph.stats()}"
    )


# One bad event in a batch


BAD = "bad-500"


def _send_with_one_bad_event(gate: Gate, graph: FaultGraph, token: str) -> list[str]:
    graph.control(bad_event_ids=[BAD])
    ids = [f"bad-{i}" for i in range(1000)]
    [outcome] = post_all(gate.base, token, [(ids, batch_call(ids))], concurrency=1)
    assert outcome.status == 202, outcome.body
    assert outcome.body["event_ids"] == ids
    good = set(ids) - {BAD}
    assert_delivered(graph, gate, good, seconds=20)
    assert wait_until(lambda: gate.event(token, BAD)["status"] == "failed", seconds=10), gate.event(
        token, BAD
    )
    return ids


def test_one_bad_event_in_1000_fails_alone_with_metas_error(gates, graph, token):
    gate = gates(delivery={"mode": "queued"})
    gate.start()
    ids = _send_with_one_bad_event(gate, graph, token)
    copies = graph.copies()
    assert BAD not in copies
    assert all(copies[e] == 1 for e in ids if e != BAD), "a good event was sent twice"
    status = gate.event(token, BAD)
    assert status["error"]["code"] == "UPSTREAM_REJECTED", status
    assert status["error"]["upstream"]["code"] == 100, status
    assert status["error"]["upstream"]["error_subcode"] == 2804019, status
    assert gate.event(token, "bad-0")["status"] == "delivered"
    assert gate.event(token, "bad-0")["fbtrace_id"].startswith("fault-")


def test_the_failed_event_is_replayed_after_a_fix(gates, graph, token):
    gate = gates(delivery={"mode": "queued"})
    gate.start()
    _send_with_one_bad_event(gate, graph, token)
    listed = gate.cli("events", "list", "--status", "failed", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]  # one object a line
    assert [(row["event_id"], row["status"]) for row in rows] == [(BAD, "failed")]
    assert rows[0]["error"]["code"] == "UPSTREAM_REJECTED", rows[0]

    graph.control(bad_event_ids=[])  # Meta accepts it now (the fix)
    replayed = gate.cli("events", "replay", "--project", PROJECT, "--event-id", BAD)
    assert replayed.returncode == 0, replayed.stderr
    assert_delivered(graph, gate, {BAD}, seconds=15)
    assert wait_until(lambda: gate.event(token, BAD)["status"] == "delivered", seconds=10)
    assert graph.copies()[BAD] == 1
    assert gate.event(token, BAD)["event_id"] == BAD  # the same id: Meta deduplicates on it


# Throttling


def test_throttled_meta_sees_a_bounded_request_rate(gates, graph, token):
    """While Meta throttles, a growing backlog on two pixels makes at most one request per
    (token, pixel) per breaker interval after the requests already in flight, and never more
    than max_concurrent_requests at once; once Meta lets go, everything is delivered."""
    concurrent = 4
    throttle_seconds = 7.0
    gate = gates(delivery={"mode": "queued", "max_concurrent_requests": concurrent})
    gate.start()
    started = time.time()
    graph.control(throttle_seconds=throttle_seconds, throttle_code=4)
    ended = started + throttle_seconds
    calls = []
    for n in range(20):  # 5,000 events arriving during the first 4 s of the throttle
        ids = [f"thr-{n}-{i}" for i in range(250)]
        calls.append((ids, batch_call(ids, PIXELS[n % 2])))
    outcomes = post_all(gate.base, token, calls, concurrency=2, spacing=0.2)
    assert {o.status for o in outcomes} == {202}
    time.sleep(max(0.0, ended - time.time()))

    log = graph.stats(log=True)["log"]
    during = [entry for entry in log if started <= entry[0] < ended]
    assert during and all(entry[4] == "throttled" for entry in during), during[:5]
    by_key: dict[tuple[str, str], list[float]] = {}
    for received_at, pixel, fingerprint, _events, _outcome in during:
        by_key.setdefault((fingerprint, pixel), []).append(received_at)
    assert len(by_key) == 2
    for times in by_key.values():
        # The first throttled answer opens the breaker; requests already under way (at most
        # max_concurrent_requests) arrive within moments of the first.
        burst = [t for t in times if t - times[0] < 0.5]
        assert len(burst) <= concurrent, times
        later = [times[len(burst) - 1], *times[len(burst) :]]
        gaps = [b - a for a, b in itertools.pairwise(later)]
        assert all(gap >= THROTTLED_INTERVAL_SECONDS - 0.05 for gap in gaps), gaps
        assert gaps == sorted(gaps) or len(gaps) < 2, f"the interval shrank: {gaps}"
    bound = len(by_key) * (concurrent + throttle_seconds / THROTTLED_INTERVAL_SECONDS)
    rate = len(during) / throttle_seconds
    assert len(during) <= bound, (
        f"{len(during)} requests ({rate:.1f}/s) during {throttle_seconds:g} s of throttling; "
        f"the documented bound is {bound:.0f} ({bound / throttle_seconds:.1f}/s)"
    )
    assert graph.stats()["max_in_flight"] <= concurrent

    accepted = accepted_ids(outcomes)
    assert_delivered(graph, gate, accepted, seconds=25)
    assert graph.stats()["max_in_flight"] <= concurrent


# Sync mode, Meta unavailable


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"hang": True}, id="hang"),
        pytest.param({"fail_rate": 1.0}, id="500s"),
        pytest.param({"throttle_seconds": 60, "throttle_code": 80004}, id="throttled"),
    ],
)
def test_sync_call_answers_202_within_the_budget_then_delivers(gates, graph, token, fault):
    budget = 1.0
    graph.control(**fault)
    gate = gates(
        delivery={"mode": "sync", "sync_budget_seconds": budget},
        graph_settings={"timeout_seconds": 0.5},
    )
    gate.start()
    [outcome] = post_all(gate.base, token, [(["sync-1"], single_call("sync-1"))], concurrency=1)
    assert outcome.status == 202, outcome.body
    assert outcome.seconds <= budget + 0.75, f"answered after {outcome.seconds:.2f} s"
    assert outcome.body["status"] == "queued"
    assert outcome.body["event_ids"] == ["sync-1"]
    assert outcome.body["reason"] == "meta_unavailable"
    assert outcome.headers is not None
    assert outcome.headers["location"] == f"/projects/{PROJECT}/events/sync-1"
    assert gate.event(token, "sync-1")["status"] == "queued"

    graph.control(defaults=True)  # Meta is back
    assert_delivered(graph, gate, {"sync-1"}, seconds=15)
    assert wait_until(lambda: gate.event(token, "sync-1")["status"] == "delivered", seconds=10)
    assert graph.copies()["sync-1"] == 1


# SIGTERM


def test_sigterm_finishes_calls_in_flight_within_shutdown_seconds_and_loses_nothing(
    gates, graph, token
):
    shutdown = 4.0
    graph.control(hang=True)  # nothing reaches Meta before the restart
    gate = gates(
        delivery={"mode": "sync", "sync_budget_seconds": 1.0},
        server={"shutdown_seconds": shutdown},
        graph_settings={"timeout_seconds": 0.5},
    )
    gate.start()
    queued_ids = [f"term-q-{i}" for i in range(200)]
    [queued] = post_all(gate.base, token, [(queued_ids, batch_call(queued_ids))], concurrency=1,
                        headers={"Prefer": "respond-async"})  # fmt: skip
    assert queued.status == 202, queued.body
    assert queued.headers is not None and queued.headers["preference-applied"] == "respond-async"

    calls = [([f"term-{n}"], single_call(f"term-{n}")) for n in range(10)]
    result: dict[str, Any] = {}

    def terminate_while_in_flight() -> None:
        assert gate.process is not None
        time.sleep(0.4)  # the sync calls are waiting for Meta
        sent = time.monotonic()
        gate.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:  # a new call while the server shuts down
            late = httpx.post(f"{gate.base}/projects/{PROJECT}/tools", json=single_call("late"),
                              headers={"Authorization": f"Bearer {token}"}, timeout=5)  # fmt: skip
            result["late"] = late.status_code
        except httpx.TransportError:
            result["late"] = "refused"
        result["alive_after_late"] = gate.process.poll() is None
        try:
            gate.process.wait(timeout=shutdown + 10)
        finally:
            result["exit_seconds"] = time.monotonic() - sent

    async def both() -> list[Outcome]:
        terminating = asyncio.get_running_loop().run_in_executor(None, terminate_while_in_flight)
        outcomes = await post_all_async(gate.base, token, calls, concurrency=10)
        await terminating
        return outcomes

    outcomes = asyncio.run(both())
    assert result["exit_seconds"] <= shutdown + 1.0, f"exited after {result['exit_seconds']:.1f} s"
    assert result["alive_after_late"] and result["late"] in ("refused", 503), result
    assert [o.status for o in outcomes] == [202] * 10, [(o.status, o.body) for o in outcomes]

    graph.control(defaults=True)
    gate.start()
    accepted = accepted_ids([*outcomes, queued])
    assert len(accepted) == 210
    assert_delivered(graph, gate, accepted, seconds=20)
