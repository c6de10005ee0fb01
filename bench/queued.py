"""5. Queued delivery: events accepted durably per second, Graph requests per event, the 202's
p99, draining a backlog, and the fault runs of the durability tests at a larger scale.

A real `funnelgate serve` in queued mode delivers to the fault Graph (tests/faultgraph.py, its
own process, which counts every event Meta accepted, by event_id); the bare forwarder
(bench/forwarder.py) to the fast fake Graph (bench/fakegraph.py), so the baseline gets the
quickest Graph there is. Load comes from wrk when installed (else the Python generator).

    .venv/bin/python bench/queued.py [--quick] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from benchlib import (
    BENCH_DIR,
    BIN,
    MARK,
    PIXEL,
    REPO,
    Load,
    auth_headers,
    free_port,
    machine,
    run_load,
    run_tool_templates,
    spawn,
    table,
    verdict,
    write_key_pair,
    write_section,
    wrk_version,
)

PROJECT = "bench-queued"
ACCESS_TOKEN = "EAAB-bench-queued-token"
PIXEL_2 = "223456789012345"
BATCH_TARGET = 20_000  # events/s accepted durably through FACEBOOK_ADS_SEND_EVENTS
SINGLE_RATIO_TARGET = 1.0  # single-event queued calls/s against the forwarder, 64 connections
EVENTS_PER_REQUEST_TARGET = 500  # Graph requests per event at saturation ≤ 1/500
CONNECTIONS = 64
BATCH_CONNECTIONS = 4  # calls of 1,000 events in flight
_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0"


@dataclass
class Result:
    markdown: str
    targets: list[tuple[str, str, bool]] = field(default_factory=list)


def _repo_on_path() -> None:
    """The repository's `tests` package importable, however the benchmark was started."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def _fault_graph() -> Any:
    """tests/faultgraph.py's FaultGraph (the tests' fake Graph with faults), not yet started."""
    _repo_on_path()
    from tests.faultgraph import FaultGraph

    return FaultGraph()


# --- events ------------------------------------------------------------------------------------


def capi_event(i: int, tag: str, now: float) -> dict[str, Any]:
    """The i-th raw CAPI event of the mix: half full customer data, a quarter already hashed,
    a quarter minimal; `tag` goes into the event id and the (unhashed) email."""
    base: dict[str, Any] = {
        "event_name": ("Purchase", "AddToCart", "Lead", "ViewContent")[i % 4],
        "event_time": int(now) - 60 - i % 600,
        "event_id": f"{tag}-{i}",
        "action_source": "website",
        "event_source_url": f"https://shop.example.com/p/{i}",
    }
    kind = ("full", "full", "hashed", "minimal")[i % 4]
    if kind == "minimal":
        base["action_source"] = "system_generated"
        del base["event_source_url"]
        base["user_data"] = {"em": f"lead.{tag}.{i}@example.com"}
        return base
    if kind == "hashed":
        digest = hashlib.sha256(f"buyer.{i}@example.com".encode()).hexdigest()
        base["user_data"] = {"em": digest, "client_user_agent": _UA, "fbp": f"fb.1.1700.{i}"}
        return base
    base["user_data"] = {
        "em": f" Buyer.{tag}.{i}@Example.COM", "fn": "Mary Ann", "ln": "Müller",
        "ct": "São Paulo", "st": "sp", "country": "BR", "external_id": f"crm-{i}",
        "client_ip_address": f"203.0.113.{i % 250}", "client_user_agent": _UA,
    }  # fmt: skip
    base["custom_data"] = {"value": 12.5 + i % 10, "currency": "EUR", "content_ids": ["SKU-1"]}
    return base


def batch_body(tag: str, now: float, size: int = 1000, pixel: str = PIXEL) -> dict[str, Any]:
    events = [capi_event(i, tag, now) for i in range(size)]
    return {"tool": "FACEBOOK_ADS_SEND_EVENTS", "parameters": {"pixel_id": pixel, "events": events}}


def batch_templates(count: int, now: float) -> list[list[str]]:
    """FACEBOOK_ADS_SEND_EVENTS bodies of 1,000 events split at MARK (one unique tag per call)."""
    return [json.dumps(batch_body(f"b{t}{MARK}", now)).split(MARK) for t in range(count)]


def single_body(event_id: str, now: float) -> dict[str, Any]:
    parameters = {
        "pixel": PIXEL, "eventName": "Purchase", "actionSource": "website", "eventId": event_id,
        "eventSourceUrl": "https://shop.example.com/thanks", "customerClientUserAgent": _UA,
        "customerEmail": f"{event_id}@example.com", "customerClientIpAddress": "203.0.113.7",
    }  # fmt: skip
    return {"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": parameters}


# --- processes ---------------------------------------------------------------------------------


class Gate:
    """A `funnelgate serve` on its own config and database, restartable."""

    def __init__(
        self, stack: ExitStack, root: Path, graph_url: str, **tables: dict[str, Any]
    ) -> None:
        from server.tokens import mint_user_token

        _repo_on_path()
        from tests.support import config_toml

        root.mkdir(parents=True)
        private = write_key_pair(root)
        tables = {**tables, "graph": {"base_url": graph_url, **tables.get("graph", {})}}
        self.config = root / "config.toml"
        self.config.write_text(config_toml(tables, project=PROJECT, access_token=ACCESS_TOKEN))
        self.database = root / "funnelgate.db"
        self.token = mint_user_token(private, PROJECT, "bench-user", ttl_seconds=4 * 3600)
        self.headers = auth_headers(self.token)
        self.path = f"/projects/{PROJECT}/tools"
        self.log = stack.enter_context((root / "funnelgate.log").open("a"))
        self.stack = stack
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FUNNELGATE_")}

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = [str(BIN / "funnelgate"), "serve", "--config", str(self.config), "--port", str(port)]
        self.process = spawn(
            self.stack, "funnelgate", args, f"{self.url}/healthz", log=self.log, env=self.env
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self) -> float:
        assert self.process is not None
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        return time.monotonic() - sent


@dataclass
class Call:
    event_ids: list[str]
    status: int | None
    body: Any
    seconds: float


async def _post(
    gate: Gate,
    bodies: Sequence[tuple[list[str], dict[str, Any]]],
    *,
    concurrency: int,
    spacing: float = 0.0,
    after: Callable[[Call], None] | None = None,
) -> list[Call]:
    calls: list[Call] = []
    indices = iter(range(len(bodies)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=gate.url, timeout=30, limits=limits) as client:

        async def worker() -> None:
            for index in indices:
                await asyncio.sleep(max(0.0, started + index * spacing - loop.time()))
                ids, body = bodies[index]
                sent = loop.time()
                try:
                    answer = await client.post(gate.path, json=body, headers=gate.headers)
                    call = Call(ids, answer.status_code, answer.json(), loop.time() - sent)
                except httpx.TransportError:
                    call = Call(ids, None, None, loop.time() - sent)
                calls.append(call)
                if after is not None:
                    after(call)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls


def post(gate: Gate, bodies: Sequence[tuple[list[str], dict[str, Any]]], **kw: Any) -> list[Call]:
    return asyncio.run(_post(gate, bodies, **kw))


def accepted(calls: Sequence[Call]) -> set[str]:
    return {e for c in calls if c.status in (200, 202) for e in c.event_ids}


def wait_delivered(graph: Any, ids: set[str], seconds: float) -> float | None:
    """Seconds until the fault Graph accepted every id (None: not within `seconds`)."""
    started = time.monotonic()
    missing = graph.wait_for(ids, seconds=seconds)
    return None if missing else time.monotonic() - started


def settle(graph: Any, quiet: float = 1.0, seconds: float = 30.0) -> None:
    """Until nothing is in flight at the fault Graph and no request came for `quiet` seconds."""
    deadline = time.monotonic() + seconds
    last = -1
    while time.monotonic() < deadline:
        stats = graph.stats()
        if stats["in_flight"] == 0 and stats["requests"] == last:
            return
        last = stats["requests"]
        time.sleep(quiet)


def outbox_states(gate: Gate, event_ids: set[str]) -> str:
    """How the outbox holds these events (read only): why they are not at Meta yet."""
    db = sqlite3.connect(f"file:{gate.database}?mode=ro", uri=True, timeout=5)
    try:
        now = time.time()
        counts: dict[str, int] = {}
        for event_id, status, next_at in db.execute(
            "SELECT event_id, status, next_at FROM outbox WHERE project_id = ?", (PROJECT,)
        ):
            if event_id in event_ids:
                label = f"{status}, due in {max(0, next_at - now):.0f} s"
                counts[label] = counts.get(label, 0) + 1
    finally:
        db.close()
    return "; ".join(f"{n:,} {label}" for label, n in sorted(counts.items())) or "none"


def copies_per_event(graph: Any, ids: set[str]) -> tuple[float, int]:
    copies = graph.copies()
    found = [copies.get(e, 0) for e in ids]
    return sum(found) / max(1, len(found)), max(found, default=0)


@contextmanager
def scenario(
    stack: ExitStack, root: Path, fake: Any, name: str, /, **tables: dict[str, Any]
) -> Iterator[Gate]:
    """A fresh server on a fresh database against the (reset) fault Graph `fake`; stopped
    after. `tables` are config tables (`graph` adds to the Graph URL)."""
    fake.reset()
    gate = Gate(stack, root / name, fake.base_url, **tables)
    gate.start()
    try:
        yield gate
    finally:
        if gate.process is not None and gate.process.poll() is None:
            gate.terminate()


# --- the measurements --------------------------------------------------------------------------


def _graph_requests(graph: Any) -> tuple[int, int]:
    stats = graph.stats()
    return int(stats["requests"]), int(stats["events"])


def throughput(
    stack: ExitStack, root: Path, graph: Any, seconds: float, repeats: int
) -> dict[str, Any]:
    """Batch and single-event queued calls against the forwarder, same run."""
    now = time.time()
    fake_port = free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    spawn(stack, "fake Graph", [sys.executable, str(BENCH_DIR / "fakegraph.py"), "--port",
          str(fake_port)], f"{fake_url}/stats")  # fmt: skip
    forwarder_port = free_port()
    forwarder_url = f"http://127.0.0.1:{forwarder_port}"
    args = [sys.executable, str(BENCH_DIR / "forwarder.py"), "--port", str(forwarder_port),
            "--graph-url", fake_url]  # fmt: skip
    forwarder = spawn(stack, "forwarder", args, f"{forwarder_url}/healthz")
    graph.reset()
    graph.control(check=False)  # Meta's per-event rules cost the fake CPU the server needs
    gate = Gate(stack, root / "throughput", graph.base_url, delivery={"mode": "queued"})
    gate.start()
    assert gate.process is not None
    singles = run_tool_templates(64, now)
    batches = batch_templates(4, now)
    for body in (json.dumps(batch_body("smoke-b", now)), json.dumps(single_body("smoke-s", now))):
        answer = httpx.post(gate.url + gate.path, content=body, headers=gate.headers, timeout=30)
        if answer.status_code != 202:
            raise RuntimeError(f"smoke call answered {answer.status_code}: {answer.text[:300]}")
    run_load(gate.url, gate.path, singles, gate.headers, connections=8, seconds=1)  # warm-up
    run_load(forwarder_url, gate.path, singles, gate.headers, connections=8, seconds=1)
    settle(graph, quiet=0.5)

    result: dict[str, Any] = {"batch": [], "single": [], "forwarder": []}
    graph_before = _graph_requests(graph)
    for _ in range(repeats):
        result["batch"].append(
            run_load(gate.url, gate.path, batches, gate.headers,
                     connections=BATCH_CONNECTIONS, seconds=seconds, server_pid=gate.process.pid)
        )  # fmt: skip
    settle(graph, quiet=0.5, seconds=120)
    graph_after = _graph_requests(graph)
    result["batch_graph"] = (graph_after[0] - graph_before[0], graph_after[1] - graph_before[1])
    for rep in range(repeats):
        order = ("single", "forwarder") if rep % 2 == 0 else ("forwarder", "single")
        for name in order:
            url, pid = (gate.url, gate.process.pid) if name == "single" else (
                forwarder_url, forwarder.pid)  # fmt: skip
            result[name].append(
                run_load(url, gate.path, singles, gate.headers, connections=CONNECTIONS,
                         seconds=seconds, server_pid=pid)
            )  # fmt: skip
    settle(graph, quiet=0.5, seconds=60)
    graph_final = _graph_requests(graph)
    result["single_graph"] = (graph_final[0] - graph_after[0], graph_final[1] - graph_after[1])
    result["accepted_events"] = sum((x.requests - x.errors) * 1000 for x in result["batch"]) + sum(
        x.requests - x.errors for x in result["single"]
    )
    result["meta_events"] = graph.stats()["distinct_accepted"]
    gate.terminate()
    return result


def drain(stack: ExitStack, root: Path, graph: Any, events: int, wait: float) -> dict[str, Any]:
    """A backlog of `events` built while Meta answers nothing, then a restart with Meta back:
    how long until Meta has every one."""
    now = time.time()
    # Attempts wait 60 s here, so none times out while the backlog builds (no backoff or
    # breaker shapes the drain); SIGTERM releases the hung ones.
    tables: dict[str, dict[str, Any]] = {
        "delivery": {"mode": "queued"},
        "server": {"shutdown_seconds": 4},
        "graph": {"timeout_seconds": 30.0},
    }
    with scenario(stack, root, graph, "drain", **tables) as gate:
        graph.control(hang=True)
        calls = post(gate, [([], batch_body(f"drain{c}", now)) for c in range(events // 1000)],
                     concurrency=BATCH_CONNECTIONS)  # fmt: skip
        if {c.status for c in calls} != {202}:
            raise RuntimeError(f"filling the backlog: {[c.status for c in calls][:10]}")
        gate.terminate()
        graph.reset()
        graph.control(check=False)
        started = time.monotonic()
        gate.start()
        ready = time.monotonic()
        deadline = started + wait
        while graph.stats()["distinct_accepted"] < events and time.monotonic() < deadline:
            time.sleep(0.05)
        done = time.monotonic()
        requests, _ = _graph_requests(graph)
        delivered = graph.stats()["distinct_accepted"]
    return {"events": events, "delivered": delivered, "total": done - started,
            "start_up": ready - started, "requests": requests}  # fmt: skip


def fault_kill_9(stack: ExitStack, root: Path, graph: Any, events: int, wait: float) -> list[str]:
    now = time.time()
    with scenario(stack, root, graph, "kill9",
                  delivery={"mode": "queued", "max_concurrent_requests": 2}) as gate:  # fmt: skip
        graph.control(latency=[0.5, 0.5])
        bodies = [([f"k9{c}-{i}" for i in range(1000)], batch_body(f"k9{c}", now))
                  for c in range(events // 1000 + 4)]  # fmt: skip
        seen: list[Call] = []
        at_kill: dict[str, int] = {}

        def kill(call: Call) -> None:
            seen.append(call)
            if not at_kill and len(accepted(seen)) >= events:
                gate.kill()
                at_kill.update(accepted=len(accepted(seen)),
                               at_meta=graph.stats()["distinct_accepted"])  # fmt: skip

        calls = post(gate, bodies, concurrency=4, after=kill)
        ids = accepted(calls)
        cut = sum(1 for c in calls if c.status is None)
        gate.start()
        took = wait_delivered(graph, ids, seconds=wait)
        if took is None:
            stuck = outbox_states(gate, ids - graph.copies().keys())
        settle(graph)
        per_event, most = copies_per_event(graph, ids)
        lost = len(ids - graph.copies().keys())
    delivered = "all" if took is not None else f"**{len(ids) - lost:,}**"
    return [f"kill -9 at {at_kill.get('accepted', 0):,} events answered 202 "
            f"({at_kill.get('at_meta', 0):,} at Meta; {cut} calls without an answer)",
            f"{len(ids):,}", delivered, f"**{lost}**", f"{per_event:.3f} (max {most})",
            f"after the restart: {took:.1f} s" if took is not None
            else f"not within {wait:g} s; outbox: {stuck}"]  # fmt: skip


def fault_meta(stack: ExitStack, root: Path, graph: Any, label: str, mode: str,
               faults: dict[str, Any], events: int, wait: float = 60.0) -> list[str]:  # fmt: skip
    now = time.time()
    with scenario(stack, root, graph, f"meta-{mode}-{len(faults)}-{faults.get('fail_rate', 0)}",
                  delivery={"mode": mode}) as gate:  # fmt: skip
        graph.control(**faults)
        bodies = [([f"m{n}"], single_body(f"m{n}", now)) for n in range(events)]
        started = time.monotonic()
        calls = post(gate, bodies, concurrency=CONNECTIONS, spacing=3.0 / events)
        ids = accepted(calls)
        took = wait_delivered(graph, ids, seconds=wait)
        total = time.monotonic() - started
        stuck = "" if took is not None else outbox_states(gate, ids - graph.copies().keys())
        settle(graph)
        per_event, most = copies_per_event(graph, ids)
    statuses: dict[str, int] = {}
    for c in calls:
        statuses[str(c.status)] = statuses.get(str(c.status), 0) + 1
    slowest = max(c.seconds for c in calls)
    delivered = f"{100 * (len(ids) - len(ids - graph.copies().keys())) / len(ids):.0f} %"
    return [f"{label}, {mode} mode: {events} single-event calls over 3 s "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))}; slowest answer "
            f"{slowest:.1f} s)", f"{len(ids):,}", delivered, str(len(ids - graph.copies().keys())),
            f"{per_event:.3f} (max {most})",
            f"all at Meta {total:.1f} s after the first call" if took is not None
            else f"not within {total:.0f} s; outbox: {stuck}"]  # fmt: skip


def fault_bad_event(stack: ExitStack, root: Path, graph: Any) -> list[str]:
    now = time.time()
    with scenario(stack, root, graph, "bad", delivery={"mode": "queued"}) as gate:
        body = batch_body("bad", now)
        ids = [e["event_id"] for e in body["parameters"]["events"]]
        bad = ids[500]
        graph.control(bad_event_ids=[bad])
        [call] = post(gate, [(ids, body)], concurrency=1)
        good = set(ids) - {bad}
        took = wait_delivered(graph, good, seconds=60)
        status: dict[str, Any] = {}
        deadline = time.monotonic() + 20
        while status.get("status") != "failed" and time.monotonic() < deadline:
            answer = httpx.get(f"{gate.url}/projects/{PROJECT}/events/{bad}",
                               headers=gate.headers, timeout=10)  # fmt: skip
            status = answer.json() if answer.status_code == 200 else {}
            time.sleep(0.1)
        requests = graph.stats()["requests"]
        per_event, most = copies_per_event(graph, good)
    error = status.get("error") or {}
    upstream = error.get("upstream") or {}
    return [f"one bad event in 1,000 (one call, 202: {call.status == 202}): {requests} Graph "
            f"requests to isolate it; it is `{status.get('status')}` with {error.get('code')} "
            f"(Meta's code {upstream.get('code')})",
            "1,000", f"{len(good & graph.copies().keys()):,} + 0 bad", "0",
            f"{per_event:.3f} (max {most})",
            f"{took:.1f} s" if took is not None else "not within 60 s"]  # fmt: skip


def fault_throttle(stack: ExitStack, root: Path, graph: Any, throttle: float) -> list[str]:
    now = time.time()
    concurrent = 4
    delivery = {"mode": "queued", "max_concurrent_requests": concurrent}
    with scenario(stack, root, graph, "throttle", delivery=delivery) as gate:
        started = time.time()
        graph.control(throttle_seconds=throttle, throttle_code=4)
        bodies = []
        for n in range(20):
            body = batch_body(f"t{n}", now, size=500, pixel=(PIXEL, PIXEL_2)[n % 2])
            bodies.append(([e["event_id"] for e in body["parameters"]["events"]], body))
        calls = post(gate, bodies, concurrency=2, spacing=throttle / 2 / len(bodies))
        ids = accepted(calls)
        time.sleep(max(0.0, started + throttle - time.time()))
        log = graph.stats(log=True)["log"]
        during = [e for e in log if started <= e[0] < started + throttle]
        took = wait_delivered(graph, ids, seconds=120)
        per_event, most = copies_per_event(graph, ids)
        max_in_flight = graph.stats()["max_in_flight"]
    keys = {(e[1], e[2]) for e in during}
    return [f"Meta throttling (code 4) for {throttle:g} s, 2 pixels, 10,000 events arriving: "
            f"{len(during)} Graph requests during it ({len(during) / throttle:.2f}/s, "
            f"{len(keys)} (token, pixel) keys); at most {max_in_flight} in flight "
            f"(max_concurrent_requests = {concurrent})",
            f"{len(ids):,}", "all" if took is not None else "**no**",
            str(len(ids - graph.copies().keys())), f"{per_event:.3f} (max {most})",
            f"{time.time() - started:.1f} s after the throttle began"]  # fmt: skip


# --- report ------------------------------------------------------------------------------------


def _median(loads: list[Load], attr: str) -> float:
    return statistics.median(getattr(load, attr) for load in loads)


def run(quick: bool = False) -> Result:
    seconds, repeats = (2.0, 1) if quick else (5.0, 2)
    backlog = 20_000 if quick else 100_000
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="funnelgate-queued-") as tmp:
        root = Path(tmp)
        graph = stack.enter_context(_fault_graph())
        measured = throughput(stack, root, graph, seconds, repeats)
        drained = drain(stack, root, graph, backlog, wait=60 if quick else 120)
        faults = [fault_kill_9(stack, root, graph, 5_000 if quick else 20_000, wait=30),
                  fault_bad_event(stack, root, graph),
                  fault_meta(stack, root, graph, "30 % HTTP 500", "queued", {"fail_rate": 0.3},
                             100 if quick else 300)]  # fmt: skip
        if not quick:
            slow = {"latency": [1.5, 3.0]}
            faults += [
                fault_meta(stack, root, graph, "Meta at 1.5–3 s", "sync", slow, 300),
                fault_meta(stack, root, graph, "Meta at 1.5–3 s", "queued", slow, 300),
                fault_meta(stack, root, graph, "Meta at 1.5–3 s and 30 % HTTP 500", "queued",
                           {**slow, "fail_rate": 0.3}, 300),
                fault_throttle(stack, root, graph, 7.0),
            ]  # fmt: skip
    return _report(measured, drained, faults, seconds, repeats, quick)


def _report(measured: dict[str, Any], drained: dict[str, Any], faults: list[list[str]],
            seconds: float, repeats: int, quick: bool) -> Result:  # fmt: skip
    batch, single, forwarder = measured["batch"], measured["single"], measured["forwarder"]
    batch_events = _median(batch, "rps") * 1000
    batch_errors = sum(x.errors for x in batch)
    single_rps, forwarder_rps = _median(single, "rps"), _median(forwarder, "rps")
    ratio = single_rps / forwarder_rps
    b_requests, b_events = measured["batch_graph"]
    s_requests, s_events = measured["single_graph"]
    per_request = b_events / max(1, b_requests)
    rows = [
        ["`FACEBOOK_ADS_SEND_EVENTS`, 1,000 events per call", BATCH_CONNECTIONS,
         f"{_median(batch, 'rps'):,.1f} calls/s = **{batch_events:,.0f} events/s**",
         f"{_median(batch, 'p50'):.1f}", f"{_median(batch, 'p99'):.1f}",
         f"{_median(batch, 'server_cpu_us') / 1000:.1f} ms/call", batch_errors,
         f"{per_request:,.0f}"],
        ["single-event calls (`FACEBOOK_ADS_SEND_FUNNEL_EVENT`), queued", CONNECTIONS,
         f"**{single_rps:,.0f}** calls/s", f"{_median(single, 'p50'):.2f}",
         f"{_median(single, 'p99'):.2f}", f"{_median(single, 'server_cpu_us'):.0f} µs/call",
         sum(x.errors for x in single), f"{s_events / max(1, s_requests):,.0f}"],
        ["bare forwarder (sync, no auth, no validation, no disk)", CONNECTIONS,
         f"{forwarder_rps:,.0f} calls/s", f"{_median(forwarder, 'p50'):.2f}",
         f"{_median(forwarder, 'p99'):.2f}", f"{_median(forwarder, 'server_cpu_us'):.0f} µs/call",
         sum(x.errors for x in forwarder), "1"],
    ]  # fmt: skip
    drain_rate = drained["events"] / max(1e-9, drained["total"] - drained["start_up"])
    drain_per_request = drained["delivered"] / max(1, drained["requests"])
    targets = [
        (f"queued, batch tool: ≥ {BATCH_TARGET:,} events/s accepted durably",
         f"{batch_events:,.0f}/s", batch_events >= BATCH_TARGET),
        (f"queued single-event calls/s ≥ {SINGLE_RATIO_TARGET:g}× forwarder at {CONNECTIONS}",
         f"{ratio:.2f}×", ratio >= SINGLE_RATIO_TARGET),
        (f"Graph requests per event at saturation ≤ 1/{EVENTS_PER_REQUEST_TARGET}",
         f"1/{per_request:,.0f}", per_request >= EVENTS_PER_REQUEST_TARGET),
    ]  # fmt: skip
    load_tool = wrk_version() and "wrk -t1 (a unique body per request)"
    load_tool = load_tool or "the Python generator in bench/benchlib.py (wrk not installed)"
    fault_table = table(["run", "events answered 200/202", "delivered", "not at Meta at the end",
                         "copies Meta accepted per event", "time"], faults)  # fmt: skip
    markdown = f"""## 5. Queued delivery: durable acceptance, batching, backlog, faults

Command: `.venv/bin/python bench/queued.py{" --quick" if quick else ""}`

{machine()}

All on 127.0.0.1 and the same {os.cpu_count()} cores. funnelgate: `funnelgate serve` with
`[delivery] mode = "queued"` (defaults otherwise: 8 Graph requests in flight, SQLite WAL with
`synchronous=FULL`, group commit), delivering to the fault Graph (`tests/faultgraph.py`, own
process, answers at once here and counts each event_id Meta accepted). The baseline is
`bench/forwarder.py` at {CONNECTIONS} connections, sync, to the fast fake Graph
(`bench/fakegraph.py`). Load: {load_tool}; {seconds:g} s per run, {repeats} run(s), medians.
Latencies in ms are the caller's: for funnelgate, the **202 once the events are on disk**.
"Events per Graph request": what the fault Graph received while (and after) each load ran.

{
        table(
            [
                "calls",
                "conns",
                "accepted durably",
                "p50",
                "p99",
                "server CPU",
                "errors",
                "events per Graph request",
            ],
            rows,
        )
    }

Single-event queued calls against the bare forwarder, same run: **{ratio:.2f}×**
(target ≥ {SINGLE_RATIO_TARGET:g}×: {verdict(ratio >= SINGLE_RATIO_TARGET)}). Nothing accepted was
lost: the fault Graph holds {measured["meta_events"]:,} distinct events for
{measured["accepted_events"]:,} answered 202 in the timed runs (more: warm-up and calls in flight
when a run's clock stopped).

**Backlog drain.** {drained["events"]:,} events queued while Meta answered nothing (every
request hung), then a SIGTERM and a restart with Meta back: all {drained["delivered"]:,} at
Meta **{drained["total"]:.1f} s** after the restart began ({drained["start_up"]:.1f} s of it
start-up): {drain_rate:,.0f} events/s in {drained["requests"]:,} Graph requests
({drain_per_request:,.0f} events per request).

**Fault runs** (each on a fresh database; "copies": how many times Meta accepted each event,
on average; the durability tests in `tests/test_durability.py` assert the same at a smaller
scale):

{fault_table}
"""
    return Result(markdown, targets)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 30 s: short runs, fewer faults")
    parser.add_argument("--write", type=Path, help="put the tables into this Markdown file")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    print(result.markdown)
    for target, value, ok in result.targets:
        print(f"- {target}: {value} {verdict(ok)}")
    if args.write:
        write_section(args.write, "queued", result.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
