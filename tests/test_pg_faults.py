"""Several instances on one PostgreSQL database, under faults: real `funnelgate serve`
processes (tests/gates.py) sharing a real PostgreSQL (tests/postgres.py), the fault Graph
(tests/faultgraph.py) as its own process, httpx as the callers; all on 127.0.0.1 and unix
sockets, every wait bounded.

The guarantees under test: an instance killed mid-run loses nothing another
instance does not deliver; a database that goes away and comes back costs documented 503s with
Retry-After, never an accepted event, and every instance recovers by itself; a credential set
from the CLI through one instance's config is used by every instance's next call.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.delivery.dispatcher import LEASE_SECONDS
from server.storage.crypto import add_secret_key
from tests.faultgraph import FaultGraph
from tests.gates import (
    PROJECT,
    Gate,
    Outcome,
    accepted_ids,
    batch_call,
    post_all,
    single_call,
    stop_all,
    wait_until,
)
from tests.postgres import Server, start_pgserver
from tests.support import rsa_private_key, sign_token

pytestmark = pytest.mark.timeout(90)

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
    """Makes Gates (instances) on this test's fault Graph; stops all of them at teardown."""
    made: list[Gate] = []

    def make(**settings: Any) -> Gate:
        gate = Gate(tmp_path / f"gate{len(made)}", key, graph, **settings)
        made.append(gate)
        return gate

    try:
        yield make
    finally:
        stop_all(made)


def start_together(*instances: Gate) -> None:
    """Starts the processes at once (their schema migrations meet on the advisory lock),
    then waits until each answers."""
    for gate in instances:
        gate.spawn()
    for gate in instances:
        gate.wait_ready()


def wait_empty(gate: Gate, seconds: float) -> dict[str, int]:
    """Until the shared outbox holds nothing queued or held (or `seconds` passed); its rows
    by status."""
    counts: dict[str, int] = {}

    def empty() -> bool:
        counts.clear()
        counts.update(gate.pending())
        return counts.get("queued", 0) + counts.get("held", 0) == 0

    wait_until(empty, seconds)
    return counts


# kill -9 of one of two instances


def test_the_survivor_delivers_what_a_killed_instance_had_claimed(
    postgres_url, gates, graph, token
):
    """≥ 20,000 events in calls of 1,000 spread over two instances, Meta slow enough that a
    backlog builds; `kill -9` of one while its dispatcher holds claims and sends; the caller
    sends the calls the dead one did not answer to the other (as a load balancer does). The
    survivor delivers every event answered 202, the dead one's claims once their lease ends,
    and the outbox ends empty."""
    # Meta at 1 s a request, one request at a time per instance: ≤ 1,000 events/s each, less
    # than the calls bring, so a backlog builds. (Meta's per-event rules are skipped: on two
    # cores the fault Graph's checks would slow the instances more than Meta does.)
    graph.control(latency=[1.0, 1.0], check=False)
    settings = {"delivery": {"mode": "queued", "max_concurrent_requests": 1},
                "storage": {"url": postgres_url}}  # fmt: skip
    survivor, victim = gates(**settings), gates(**settings)
    start_together(survivor, victim)
    calls = []
    for c in range(24):
        ids = [f"k9-{c}-{i}" for i in range(1000)]
        calls.append((ids, batch_call(ids)))
    answered: list[Outcome] = []
    at_kill: dict[str, Any] = {}

    def target(index: int) -> str:
        return str(victim.base if index % 2 and not at_kill else survivor.base)

    def kill_mid_run(outcome: Outcome) -> None:
        answered.append(outcome)
        if at_kill or len(accepted_ids(answered)) < 8_000:
            return
        if not victim.log_lines("graph_attempt"):
            return  # its dispatcher has not sent yet
        pending, leased = victim.pending(), victim.leased()
        stats = graph.stats()
        victim.kill()  # while calls still arrive
        graph.control(latency=[0.05, 0.05])  # Meta quick again: the drain waits on leases
        at_kill.update(
            time=time.monotonic(),
            accepted=len(accepted_ids(answered)),
            at_meta=stats["distinct_accepted"],
            in_flight_at_meta=stats["in_flight"],
            sends_by_victim=victim.log_lines("graph_attempt"),
            queued=pending.get("queued", 0),
            leased=leased,
        )

    # Spread over ~7 s, so the kill comes while calls are still arriving.
    outcomes = post_all(target, token, calls, concurrency=4, spacing=0.3, after=kill_mid_run)
    assert at_kill, "the instance was not killed during the run"
    assert {o.status for o in outcomes} <= {202, None}, [o.body for o in outcomes if o.status]
    unanswered = [o for o in outcomes if o.status is None]
    assert {o.base for o in unanswered} <= {victim.base}, at_kill
    # The load balancer's retry: the same events (the same event_ids) to the survivor.
    retried = post_all(survivor.base, token, [(o.event_ids, batch_call(o.event_ids))
                                              for o in unanswered], concurrency=4)  # fmt: skip
    assert {o.status for o in retried} <= {202}, [o.body for o in retried]
    accepted = accepted_ids([*outcomes, *retried])
    assert len(accepted) == 24_000
    assert at_kill["queued"] > 0 and at_kill["at_meta"] < at_kill["accepted"], at_kill

    missing = graph.wait_for(accepted, seconds=LEASE_SECONDS + 40)
    assert not missing, (
        f"{len(missing)} of {len(accepted)} accepted events not delivered; at the kill: "
        f"{at_kill}; outbox: {survivor.outbox_rows(sorted(missing))}; Graph: {graph.stats()}\n"
        f"{survivor.log_tail()}"
    )
    left = wait_empty(survivor, seconds=LEASE_SECONDS + 10)
    assert left.get("queued", 0) == left.get("held", 0) == 0, left
    assert left.get("failed", 0) == 0, left


# PostgreSQL restarts under load


@pytest.fixture
def restartable_postgres(postgres_server: Server) -> Iterator[Server]:
    """The session's server when the tests may stop it (a pgserver one), else one of this
    test's own: the test never skips."""
    if postgres_server.restartable:
        yield postgres_server
        return
    own = start_pgserver()
    try:
        yield own
    finally:
        own.stop()


@pytest.fixture
def restartable_url(restartable_postgres: Server) -> Iterator[str]:
    """A database of the test's own on that server."""
    with restartable_postgres.fresh_database() as url:
        yield url


class Outage:
    """Stops PostgreSQL `after` seconds from its start, for `seconds`, then starts it again,
    in a thread; `at` holds the wall-clock times of each step. Whatever happens, the server
    is running again once `join` returns."""

    def __init__(self, server: Server, *, after: float, seconds: float) -> None:
        self.at: dict[str, float] = {}
        self._server = server
        self._thread = threading.Thread(target=self._run, args=(after, seconds), daemon=True)
        self._thread.start()

    def _run(self, after: float, seconds: float) -> None:
        time.sleep(after)
        self.at["stopping"] = time.time()
        try:
            self._server.stop_postgres()
            self.at["stopped"] = time.time()
            time.sleep(seconds)
        finally:
            self.at["starting"] = time.time()
            self._server.start_postgres()
            self.at["started"] = time.time()

    def join(self) -> None:
        self._thread.join(timeout=60)
        if "started" not in self.at:  # the thread failed or hangs: the server must run
            self._server.start_postgres()


class Probes:
    """GET /readyz on each instance every 0.1 s, in a thread, until stopped: (wall clock,
    base URL, status or None) for each probe."""

    def __init__(self, *instances: Gate) -> None:
        self.seen: list[tuple[float, str, int | None]] = []
        self._bases = [gate.base for gate in instances]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.1):
                for base in self._bases:
                    try:
                        status: int | None = client.get(f"{base}/readyz").status_code
                    except httpx.TransportError:
                        status = None
                    self.seen.append((time.time(), base, status))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def statuses(self, base: str, since: float = 0.0, until: float = float("inf")) -> list[Any]:
        return [status for at, b, status in self.seen if b == base and since <= at < until]


def test_a_postgresql_restart_under_load_costs_only_documented_503s_and_no_event(
    restartable_postgres, restartable_url, gates, graph, token
):
    """Queued calls to two instances for ~12 s while PostgreSQL stops for 2 s and starts again:
    each call answers 202 or 503 STORAGE_UNAVAILABLE with Retry-After, within the caller's
    timeout; /readyz goes 503 and back to 200; the instances recover by themselves (the calls
    after the restart are accepted); every event answered 202 reaches Meta, and the outbox
    ends empty."""
    client_timeout = 15.0
    settings = {"delivery": {"mode": "queued"}, "storage": {"url": restartable_url}}
    first, second = gates(**settings), gates(**settings)
    start_together(first, second)
    calls = []
    for c in range(240):
        ids = [f"pg-{c}-{i}" for i in range(20)]
        calls.append((ids, batch_call(ids)))

    probes = Probes(first, second)
    outage = Outage(restartable_postgres, after=2.5, seconds=2.0)
    try:
        outcomes = post_all(
            lambda i: (first, second)[i % 2].base, token, calls, concurrency=8,
            spacing=0.05, headers={"Prefer": "respond-async"}, timeout=client_timeout,
        )  # fmt: skip
    finally:
        outage.join()
        probes.stop()
    at = outage.at
    assert set(at) == {"stopping", "stopped", "starting", "started"}, at

    assert {o.status for o in outcomes} <= {202, 503}, [
        (o.status, o.body) for o in outcomes if o.status not in (202, 503)
    ][:5]
    for o in outcomes:
        if o.status == 503:
            assert o.body["code"] == "STORAGE_UNAVAILABLE", o.body
            assert o.headers is not None and int(o.headers["retry-after"]) > 0, o.headers
    assert max(o.seconds for o in outcomes) < client_timeout
    # Recovered by themselves: the calls sent a few seconds after the restart are accepted.
    late = [o for o in outcomes if o.sent_at > at["started"] + 3]
    assert late and {o.status for o in late} == {202}, [
        (o.status, o.body) for o in late if o.status != 202
    ][:3]
    for gate in (first, second):
        assert 200 in probes.statuses(gate.base, 0, at["stopping"]), gate.base
        during = probes.statuses(gate.base, at["stopped"], at["starting"])
        assert 503 in during, (gate.base, during)
        after = probes.statuses(gate.base, at["started"])
        assert 200 in after, (gate.base, after)

    accepted = accepted_ids(outcomes)
    missing = graph.wait_for(accepted, seconds=LEASE_SECONDS + 30)
    assert not missing, (
        f"{len(missing)} of {len(accepted)} accepted events not delivered; outage: {at}; "
        f"outbox: {first.outbox_rows(sorted(missing))}; Graph: {graph.stats()}\n"
        f"{first.log_tail()}\n{second.log_tail()}"
    )
    # Sends the outage cut are due again once their lease ends (a copy Meta deduplicates).
    left = wait_empty(first, seconds=LEASE_SECONDS + 10)
    assert left.get("queued", 0) == left.get("held", 0) == 0, left


# Credentials across instances


def fingerprint(access_token: str) -> str:
    """How the fault Graph's request log names a token (tests/faultgraph.py)."""
    return hashlib.sha256(access_token.encode()).hexdigest()[:12]


def test_a_credential_set_through_one_instance_is_used_by_anothers_next_call(
    postgres_url, gates, graph, token, tmp_path
):
    """Two instances with the same secret key on one database: `credentials set` with the
    first's config, then a sync call to the second goes out with that token; set again (a new
    token for the same credential), and the second's next call has the new one. No restart,
    no cache to wait for."""
    secret = tmp_path / "secret.key"
    add_secret_key(secret)
    settings = {"delivery": {"mode": "sync"},
                "storage": {"url": postgres_url, "secret_key_file": str(secret)}}  # fmt: skip
    first, second = gates(**settings), gates(**settings)
    start_together(first, second)

    def call_second(event_id: str) -> str:
        """A sync call to the second instance; the fingerprint of the token Meta got."""
        [outcome] = post_all(second.base, token, [([event_id], single_call(event_id))],
                             concurrency=1)  # fmt: skip
        assert outcome.status == 200, outcome.body
        [*_, last] = graph.stats(log=True)["log"]
        assert last[4] == "accepted", last
        return str(last[2])

    assert call_second("cred-0") == fingerprint("EAAB-durable-token")  # the project's token
    for n, user_token in enumerate(("EAAB-user-token-1", "EAAB-user-token-2"), start=1):
        stored = first.cli("credentials", "set", "--project", PROJECT, "--user", USER,
                           "--access-token-file", "-", stdin=user_token)  # fmt: skip
        assert stored.returncode == 0, stored.stderr
        assert stored.stdout.startswith("stored" if n == 1 else "replaced"), stored.stdout
        assert call_second(f"cred-{n}") == fingerprint(user_token)
