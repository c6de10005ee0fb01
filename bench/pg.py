"""6. PostgreSQL: queued events accepted durably on PostgreSQL vs SQLite, one instance vs two on
one database, and the time one or two instances take to drain a backlog.

Real `funnelgate serve` processes in queued mode deliver to the fast fake Graph
(bench/fakegraph.py); PostgreSQL is the tests' throwaway server (tests/postgres.py: the
`pgserver` wheel's PostgreSQL, on a unix socket, or FUNNELGATE_TEST_DATABASE_URL's), a fresh
database per setup. Load comes from wrk when installed (else the Python generator), the same
calls for every setup, interleaved, medians.

    .venv/bin/python bench/pg.py [--quick] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from benchlib import (
    BENCH_DIR,
    BIN,
    PIXEL,
    REPO,
    Load,
    background_load,
    cpu_seconds,
    free_port,
    http,
    machine,
    spawn,
    stop,
    table,
    write_section,
    wrk_version,
)
from queued import BATCH_CONNECTIONS, PROJECT, Gate, Result, batch_body, batch_templates

SETUPS = ("SQLite, 1 instance", "PostgreSQL, 1 instance", "PostgreSQL, 2 instances")


def _postgres() -> Any:
    """The tests' PostgreSQL server (tests/postgres.py's Server): stopped by the caller."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.postgres import start_server

    return start_server()


@contextmanager
def _database(server: Any) -> Iterator[str]:
    """A fresh database on `server` with funnelgate's schema; dropped afterwards."""
    from server.storage import postgres, schema_pg

    with server.fresh_database() as url:
        db = postgres.connect(url)
        try:
            schema_pg.upgrade(db)
        finally:
            db.close()
        yield url


def _sql(url: str, statement: str) -> Any:
    """One statement on a connection of its own (autocommit); its first row."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(statement)
        return cursor.fetchone() if cursor.description else None


def _pending(url: str) -> int:
    row = _sql(url, "SELECT count(*) FROM outbox WHERE status IN ('queued', 'held')")
    return int(row[0])


def _fake_graph(stack: ExitStack) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, str(BENCH_DIR / "fakegraph.py"), "--port", str(port)]
    spawn(stack, "fake Graph", args, f"{url}/stats")
    return url


def _graph_events(graph_url: str) -> int:
    return int(http("GET", f"{graph_url}/stats")[1]["events"])


def _settle(graph_url: str, quiet: float = 0.5, seconds: float = 60.0) -> None:
    """Until the fake Graph got no event for `quiet` seconds: the last run's backlog is
    delivered and costs the next run nothing."""
    deadline = time.monotonic() + seconds
    last = -1
    while time.monotonic() < deadline:
        events = _graph_events(graph_url)
        if events == last:
            return
        last = events
        time.sleep(quiet)


def _spawn(gates: Sequence[Gate]) -> None:
    """Starts the processes at once, without waiting for them."""
    for gate in gates:
        port = free_port()
        gate.url = f"http://127.0.0.1:{port}"
        args = [str(BIN / "funnelgate"), "serve", "--config", str(gate.config), "--port", str(port)]
        gate.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=gate.log, env=gate.env, cwd=REPO
        )
        gate.stack.callback(stop, gate.process)


def _check_running(gates: Sequence[Gate]) -> None:
    for gate in gates:
        assert gate.process is not None
        if gate.process.poll() is not None:
            raise RuntimeError(f"funnelgate exited with {gate.process.returncode}")


def _start_together(gates: Sequence[Gate]) -> None:
    """Starts the processes at once; returns once every one answers /healthz."""
    _spawn(gates)
    deadline = time.monotonic() + 30
    for gate in gates:
        while True:
            _check_running(gates)
            if time.monotonic() > deadline:
                raise RuntimeError("funnelgate did not start in 30 s")
            try:
                if http("GET", f"{gate.url}/healthz", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)


def _pg_cpu(pid: int | None) -> float:
    """PostgreSQL's CPU seconds so far: the postmaster's and its live children's, and those of
    the children that ended (a backend's exit folds its time into the postmaster's cutime and
    cstime, https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html)."""
    if pid is None:
        return 0.0
    ticks = 0
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children += (task / "children").read_text().split()
    for each in [pid, *map(int, children)]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended meanwhile: counted in the postmaster's cutime
            continue
        ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _cpu(gates: Sequence[Gate]) -> float:
    return sum(cpu_seconds(gate.process.pid) for gate in gates if gate.process is not None)


# --- 1 and 2: events accepted durably ----------------------------------------------------------


@dataclass
class Accepted:
    """One load run over a setup's instances (the connections split among them)."""

    events_per_second: float
    p50: float
    p99: float
    errors: int
    cpu_us: float  # funnelgate's CPU (every instance's) per event accepted
    pg_cpu_us: float | None  # PostgreSQL's (every process of the server) per event accepted


def _accept(
    gates: Sequence[Gate], templates: list[list[str]], seconds: float, pg_pid: int | None
) -> Accepted:
    cpu, pg_cpu = _cpu(gates), _pg_cpu(pg_pid)
    connections = BATCH_CONNECTIONS // len(gates)
    with ExitStack() as loads:
        results = [
            loads.enter_context(
                background_load(
                    gate.url,
                    gate.path,
                    templates,
                    gate.headers,
                    connections=connections,
                    seconds=seconds,
                    pacing=None,
                )
            )
            for gate in gates
        ]
    runs: list[Load] = [result[0] for result in results]
    events = sum((run.requests - run.errors) * 1000 for run in runs)
    used, pg_used = _cpu(gates) - cpu, (_pg_cpu(pg_pid) - pg_cpu) if pg_pid else None
    return Accepted(
        events_per_second=sum((run.requests - run.errors) * 1000 / run.seconds for run in runs),
        p50=max(run.p50 for run in runs),
        p99=max(run.p99 for run in runs),
        errors=sum(run.errors for run in runs),
        cpu_us=used / max(1, events) * 1e6,
        pg_cpu_us=None if pg_used is None else pg_used / max(1, events) * 1e6,
    )


def accepted(
    stack: ExitStack, root: Path, server: Any, graph_url: str, seconds: float, repeats: int
) -> dict[str, list[Accepted]]:
    """The same batch calls against each setup, interleaved (the order turns each round)."""
    now = time.time()
    pg_pid = server.pg.get_pid() if server.pg is not None else None
    one_url = stack.enter_context(_database(server))
    two_url = stack.enter_context(_database(server))
    queued = {"mode": "queued"}
    setups: dict[str, list[Gate]] = {
        SETUPS[0]: [Gate(stack, root / "sqlite", graph_url, delivery=queued)],
        SETUPS[1]: [Gate(stack, root / "pg1", graph_url, delivery=queued,
                         storage={"url": one_url})],
        SETUPS[2]: [Gate(stack, root / f"pg2-{n}", graph_url, delivery=queued,
                         storage={"url": two_url}) for n in (1, 2)],
    }  # fmt: skip
    _start_together([gate for gates in setups.values() for gate in gates])
    templates = batch_templates(4, now)
    smoke = orjson.dumps(batch_body("smoke", now))
    for gates in setups.values():
        for gate in gates:
            answer = httpx.post(gate.url + gate.path, content=smoke, headers=gate.headers,
                                timeout=30)  # fmt: skip
            if answer.status_code != 202:
                raise RuntimeError(f"smoke call answered {answer.status_code}: {answer.text}")
        _accept(gates, templates, 1.0, None)  # warm-up
        _settle(graph_url)
    # No ANALYZE: a fresh table has no planner statistics, as a deployment's outbox has stale
    # ones after a backlog built during an outage; the dispatcher's statements must not care.
    result: dict[str, list[Accepted]] = {name: [] for name in setups}
    names = list(setups)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            gates = setups[name]
            result[name].append(_accept(gates, templates, seconds, None if "SQLite" in name
                                        else pg_pid))  # fmt: skip
            _settle(graph_url)
    return result


# --- 3: draining a backlog ---------------------------------------------------------------------


def _insert_backlog(url: str, events: int, now: float) -> None:
    """`events` queued events of the project, due now, straight into the outbox (the
    statement the server's inserts use); no ANALYZE (see above)."""
    from server.storage import outbox, postgres
    from tools.hashing import sha256_hex

    db = postgres.connect(url)
    try:
        for start in range(0, events, 5000):
            batch = []
            for i in range(start, min(events, start + 5000)):
                event = {
                    "event_name": "Purchase", "event_time": int(now) - 60, "event_id": f"bl-{i}",
                    "action_source": "website", "event_source_url": f"https://shop.example.com/{i}",
                    "user_data": {"em": [sha256_hex(f"buyer.{i}@example.com")],
                                  "external_id": [sha256_hex(f"crm-{i}")],
                                  "client_user_agent": "Mozilla/5.0 (X11; Linux x86_64)"},
                    "custom_data": {"value": 12.5, "currency": "EUR"},
                }  # fmt: skip
                batch.append(outbox.NewEvent(PROJECT, "bench-user", None, PIXEL, None, event,
                                             orjson.dumps(event)))  # fmt: skip
            db.execute("BEGIN")
            outbox.insert(db, outbox.rows_of(batch, now=now, next_at=now))
            db.execute("COMMIT")
    finally:
        db.close()


def drain(
    stack: ExitStack, root: Path, server: Any, graph_url: str, events: int, instances: int,
    wait: float,
) -> dict[str, Any]:  # fmt: skip
    """A backlog of `events` in a fresh database, then `instances` instances started at once:
    the seconds from their start, and from the first event at the Graph (their dispatchers
    at work), until the outbox holds nothing pending; the CPU of that drain per event."""
    now = time.time()
    pg_pid = server.pg.get_pid() if server.pg is not None else None
    with ExitStack() as own, _database(server) as url:
        _insert_backlog(url, events, now)
        gates = [Gate(own, root / f"drain{instances}-{n}", graph_url, delivery={"mode": "queued"},
                      storage={"url": url}) for n in range(instances)]  # fmt: skip
        graph_before = _graph_events(graph_url)
        started = time.monotonic()
        _spawn(gates)
        while _graph_events(graph_url) == graph_before:  # until the first send arrives
            _check_running(gates)
            if time.monotonic() > started + 30:
                raise RuntimeError("no event reached the Graph within 30 s of the start")
            time.sleep(0.01)
        first = time.monotonic()
        cpu, pg_cpu = _cpu(gates), _pg_cpu(pg_pid)  # from here on: the drain's
        deadline = started + wait
        left = _pending(url)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _pending(url)
        done = time.monotonic()
        used = _cpu(gates) - cpu
        pg_used = (_pg_cpu(pg_pid) - pg_cpu) if pg_pid else None
        for gate in gates:
            assert gate.process is not None
            stop(gate.process)
    drained = events - left
    return {"instances": instances, "events": events, "left": left, "total": done - started,
            "first": first - started, "drain": done - first,
            "cpu_us": used / max(1, drained) * 1e6,
            "pg_cpu_us": None if pg_used is None else pg_used / max(1, drained) * 1e6}  # fmt: skip


# --- report ------------------------------------------------------------------------------------


def run(quick: bool = False) -> Result:
    seconds, repeats = (2.0, 1) if quick else (5.0, 3)
    backlog = 20_000 if quick else 100_000
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="funnelgate-pg-") as tmp:
        root = Path(tmp)
        server = _postgres()
        stack.callback(server.stop)
        settings = _settings(server)
        graph_url = _fake_graph(stack)
        measured = accepted(stack, root, server, graph_url, seconds, repeats)
        drains = [drain(stack, root, server, graph_url, backlog, n, wait=90 if quick else 150)
                  for n in (1, 2)]  # fmt: skip
    return _report(measured, drains, settings, server.pg is not None, seconds, repeats, quick)


def _settings(server: Any) -> str:
    names = ("server_version", "synchronous_commit", "fsync", "shared_buffers", "wal_level")
    values = [f"{name} {_sql(server.url, f'SHOW {name}')[0]}" for name in names]
    return ", ".join(values)


def _median(runs: list[Accepted], value: Callable[[Accepted], float | None]) -> float | None:
    found = [v for v in (value(run) for run in runs) if v is not None]
    return statistics.median(found) if found else None


def _us(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} µs"


def _report(measured: dict[str, list[Accepted]], drains: list[dict[str, Any]], settings: str,
            own_server: bool, seconds: float, repeats: int, quick: bool) -> Result:  # fmt: skip
    rows = []
    for name, runs in measured.items():
        rate = _median(runs, lambda r: r.events_per_second) or 0.0
        rows.append([name, f"**{rate:,.0f}** events/s", f"{_median(runs, lambda r: r.p50):.0f}",
                     f"{_median(runs, lambda r: r.p99):.0f}", sum(r.errors for r in runs),
                     _us(_median(runs, lambda r: r.cpu_us)),
                     _us(_median(runs, lambda r: r.pg_cpu_us))])  # fmt: skip
    rates = {name: _median(runs, lambda r: r.events_per_second) or 0.0
             for name, runs in measured.items()}  # fmt: skip
    cpus = {name: _median(runs, lambda r: r.cpu_us) or 0.0 for name, runs in measured.items()}
    drain_rows = [
        [f"{d['instances']} instance{'s' if d['instances'] > 1 else ''}",
         f"{d['events'] - d['left']:,} of {d['events']:,}", f"{d['first']:.1f} s",
         f"**{d['drain']:.1f} s**", f"{d['total']:.1f} s",
         f"{(d['events'] - d['left']) / max(1e-9, d['drain']):,.0f}",
         _us(d["cpu_us"]), _us(d["pg_cpu_us"])]
        for d in drains
    ]  # fmt: skip
    one, two = drains
    load_tool = wrk_version() and "wrk -t1 per instance (a unique body per request)"
    load_tool = load_tool or "the Python generator in bench/benchlib.py (wrk not installed)"
    pg_note = ("the `pgserver` wheel's PostgreSQL on a unix socket, on the same cores"
               if own_server else "the server FUNNELGATE_TEST_DATABASE_URL names")  # fmt: skip
    markdown = f"""## 6. PostgreSQL: one database, one or two instances

Command: `.venv/bin/python bench/pg.py{" --quick" if quick else ""}`

{machine()}

All on 127.0.0.1 and the same {os.cpu_count()} cores. funnelgate: `funnelgate serve` with
`[delivery] mode = "queued"` (defaults otherwise), delivering to the fast fake Graph
(`bench/fakegraph.py`) as it accepts. PostgreSQL: {pg_note} ({settings}); a fresh database per
setup, never analyzed (the statistics a backlog meets after an outage: stale or none).
SQLite: the file in WAL mode with `synchronous=FULL`. Load: {load_tool};
`FACEBOOK_ADS_SEND_EVENTS` calls of 1,000 events, {BATCH_CONNECTIONS} connections in all (two
instances: {BATCH_CONNECTIONS // 2} each), {seconds:g} s per run, {repeats} run(s) per setup,
interleaved, medians. The 202 comes once the events are committed (on PostgreSQL with
`synchronous_commit = on`: flushed to its WAL). CPU per event accepted: every funnelgate
process's (accepting, and delivering as it goes), and PostgreSQL's (all its processes) when
the benchmark runs the server.

{table(["setup", "accepted durably", "p50 ms", "p99 ms", "errors", "funnelgate CPU/event",
        "PostgreSQL CPU/event"], rows)}

PostgreSQL vs SQLite, one instance: {rates[SETUPS[1]] / max(1.0, rates[SETUPS[0]]):.2f}× the
events/s at {cpus[SETUPS[1]] / max(1.0, cpus[SETUPS[0]]):.2f}× funnelgate's CPU per event. Two
instances vs one on PostgreSQL: {rates[SETUPS[2]] / max(1.0, rates[SETUPS[1]]):.2f}× the events/s
(on {os.cpu_count()} cores shared with PostgreSQL, the load generator and the fake Graph, a
throughput ratio says little), {cpus[SETUPS[2]] / max(1.0, cpus[SETUPS[1]]):.2f}× the CPU per
event summed over both processes.

**Backlog drain.** {one["events"]:,} queued events written straight into a fresh database's
outbox (the server's own insert statement; no `ANALYZE`), then one or two instances started
at once: the time from their start until the first event reached the Graph (start-up: the
dispatchers at work), from there until the outbox held nothing pending (the drain; its events/s
and CPU per event), and in all.

{table(["instances", "delivered", "start → first event", "drain: first event → 0 pending",
        "start → 0 pending", "events/s", "funnelgate CPU/event", "PostgreSQL CPU/event"],
       drain_rows)}

Two instances drain it in {two["drain"] / max(1e-9, one["drain"]):.2f}× one's time.
"""  # fmt: skip
    return Result(markdown, [])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, a 20,000-event backlog")
    parser.add_argument("--write", type=Path, help="put the tables into this Markdown file")
    args = parser.parse_args(argv)
    started = time.monotonic()
    result = run(quick=args.quick)
    print(result.markdown)
    print(f"bench/pg.py took {time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.write:
        write_section(args.write, "pg", result.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
