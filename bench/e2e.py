"""2. End to end, sync: a real `funnelgate serve` vs the bare forwarder baseline, same run.

Both POST to the same fake Graph (its own process); wrk (or the Python fallback) drives them on
127.0.0.1 at each concurrency, interleaved, median of the repetitions. Then both at a fixed
rate of half funnelgate's best throughput, for the latency funnelgate adds.

    .venv/bin/python bench/e2e.py [--seconds 5] [--repeats 3] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    ACCESS_TOKEN,
    PIXEL,
    Load,
    Pacing,
    auth_headers,
    graph_received,
    machine,
    parameters,
    run_load,
    run_tool_templates,
    servers,
    smoke,
    table,
    verdict,
    write_section,
    wrk_version,
)

CONCURRENCIES = (1, 8, 64)
RATIO_TARGET = 0.8  # funnelgate req/s at least this fraction of the baseline's, at 8 and 64
ADDED_P99_TARGET_MS = 3.0
PACED_CONNECTIONS = 16
TARGETS = ("funnelgate", "uncoalesced", "baseline")
LABELS = {
    "funnelgate": "funnelgate",
    "uncoalesced": "funnelgate, coalesce off",
    "baseline": "bare forwarder",
}


@dataclass
class Result:
    markdown: str
    half_rate: float
    targets: list[tuple[str, str, bool]] = field(default_factory=list)


def _median(loads: list[Load], attr: str) -> float:
    return statistics.median(getattr(load, attr) for load in loads)


def _rps(loads: list[Load]) -> str:
    values = [load.rps for load in loads]
    spread = f" ({min(values):,.0f}–{max(values):,.0f})" if len(values) > 1 else ""
    return f"{statistics.median(values):,.0f}{spread}"


def _count_lines(path: Path) -> int:
    with path.open("rb") as log:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: log.read(1 << 20), b""))


def run(seconds: float = 5.0, repeats: int = 3, half_seconds: float = 5.0) -> Result:
    now = time.time()
    templates = run_tool_templates(64, now)
    with servers(forwarder=True, uncoalesced=True) as found:
        assert found.funnelgate and found.uncoalesced and found.forwarder
        headers = auth_headers(found.token)
        path = found.tool_path()
        endpoints = {
            "funnelgate": (found.funnelgate_url, found.funnelgate.pid),
            "uncoalesced": (found.uncoalesced_url, found.uncoalesced.pid),
            "baseline": (found.forwarder_url, found.forwarder.pid),
        }
        for name, (url, _) in endpoints.items():
            smoke(url, found, now, mapped=name != "baseline")

        graph_body = json.dumps({"data": [parameters(0, "cap", now)], "access_token": ACCESS_TOKEN})
        capacity = run_load(
            found.graph_url,
            f"/v24.0/{PIXEL}/events",
            [[graph_body]],
            {"Content-Type": "application/json"},
            connections=64,
            seconds=5,
        )
        for url, pid in endpoints.values():  # warm-up, discarded
            run_load(url, path, templates, headers, connections=8, seconds=2, server_pid=pid)

        loads: dict[tuple[str, int], list[Load]] = {
            (t, c): [] for t in TARGETS for c in CONCURRENCIES
        }
        # funnelgate's (events, Graph requests) per run: how many calls shared a request
        shared: dict[int, list[tuple[int, int]]] = {c: [] for c in CONCURRENCIES}
        for rep in range(repeats):
            for c in CONCURRENCIES:
                for name in TARGETS if rep % 2 == 0 else reversed(TARGETS):
                    url, pid = endpoints[name]
                    posts, events = graph_received(found)
                    loads[name, c].append(
                        run_load(
                            url,
                            path,
                            templates,
                            headers,
                            connections=c,
                            seconds=seconds,
                            server_pid=pid,
                        )
                    )
                    if name == "funnelgate":
                        posts_after, events_after = graph_received(found)
                        shared[c].append((events_after - events, posts_after - posts))
        best = max(_median(loads["funnelgate", c], "rps") for c in CONCURRENCIES)
        half_rate = best / 2
        half: dict[str, list[Load]] = {name: [] for name in ("funnelgate", "baseline")}
        for rep in range(repeats):
            for name in half if rep % 2 == 0 else reversed(half):
                url, pid = endpoints[name]
                pacing = Pacing.for_rate(
                    half_rate, PACED_CONNECTIONS, _median(loads[name, 1], "p50")
                )
                half[name].append(
                    run_load(
                        url,
                        path,
                        templates,
                        headers,
                        connections=PACED_CONNECTIONS,
                        seconds=half_seconds,
                        pacing=pacing,
                        server_pid=pid,
                    )
                )
        assert found.log_path is not None
        log_lines = _count_lines(found.log_path)

    calls_per_post = {
        c: sum(e for e, _ in shared[c]) / max(1, sum(p for _, p in shared[c]))
        for c in CONCURRENCIES
    }
    fg_calls = sum(x.requests for c in CONCURRENCIES for x in loads["funnelgate", c])
    fg_events = sum(e for c in CONCURRENCIES for e, _ in shared[c])
    errors = {n: sum(x.errors for c in CONCURRENCIES for x in loads[n, c]) for n in TARGETS}
    errors["funnelgate"] += sum(x.errors for x in half["funnelgate"])
    errors["baseline"] += sum(x.errors for x in half["baseline"])
    rows, ratio_rows, targets = [], [], []
    for c in CONCURRENCIES:
        for name in TARGETS:
            group = loads[name, c]
            rows.append(
                [
                    c,
                    LABELS[name],
                    _rps(group),
                    f"{_median(group, 'p50'):.2f}",
                    f"{_median(group, 'p99'):.2f}",
                    f"{_median(group, 'server_cpu_us'):.0f}",
                    f"{calls_per_post[c]:.1f}" if name == "funnelgate" else "1",
                ]
            )
        base = _median(loads["baseline", c], "rps")
        ratio = _median(loads["funnelgate", c], "rps") / base
        plain = _median(loads["uncoalesced", c], "rps") / base
        goal = f"≥ {RATIO_TARGET}×: {verdict(ratio >= RATIO_TARGET)}" if c > 1 else "—"
        ratio_rows.append([c, f"**{ratio:.2f}×**", f"{plain:.2f}×", goal])
        if c > 1:
            targets.append(
                (
                    f"sync calls/s ≥ {RATIO_TARGET}× baseline at {c}",
                    f"{ratio:.2f}×",
                    ratio >= RATIO_TARGET,
                )
            )
    half_rows = [
        [
            LABELS[name],
            f"{_median(half[name], 'rps'):,.0f}",
            f"{_median(half[name], 'p50'):.2f}",
            f"{_median(half[name], 'p99'):.2f}",
            f"{_median(half[name], 'server_cpu_us'):.0f}",
        ]
        for name in half
    ]
    added50 = _median(half["funnelgate"], "p50") - _median(half["baseline"], "p50")
    added99 = _median(half["funnelgate"], "p99") - _median(half["baseline"], "p99")
    half_rows.append(
        ["**added by funnelgate**", "", f"**{added50:+.2f}**", f"**{added99:+.2f}**", ""]
    )
    targets.append(
        (
            f"p99 added ≤ {ADDED_P99_TARGET_MS:g} ms at half load",
            f"{added99:+.2f} ms",
            added99 <= ADDED_P99_TARGET_MS,
        )
    )
    load_tool = wrk_version() and "wrk -t1 (Lua script: POST, headers, a unique body per request)"
    load_tool = load_tool or "the Python generator in bench/benchlib.py (wrk not installed)"
    markdown = f"""## 2. End to end, sync: funnelgate vs a bare forwarder

Command: `.venv/bin/python bench/e2e.py --seconds {seconds:g} --repeats {repeats}`

{machine()}

All on 127.0.0.1 and the same {os.cpu_count()} cores: a fake Graph (`bench/fakegraph.py`, own
process, answers 200 at once); two `funnelgate serve --config <tmp>` processes as the CLI
starts them (one uvicorn process each, JSON logs on, to a file: {log_lines:,} lines from the
first), one with the defaults and one with `graph.coalesce = false`; and the baseline
`bench/forwarder.py` (starlette + aiohttp, parses the Run Tool JSON and POSTs it to the same
fake Graph: no auth, no validation, no hashing, no logs). Load: {load_tool}, the 64-event mix
of the map core with a unique email and event id per request. {seconds:g} s per point,
{repeats} repetitions interleaved; medians (req/s range in brackets). Latencies in ms. CPU
µs/req: the server process's user+system time over the run / requests.

Not the bottleneck: the load generator alone drives the fake Graph at
**{capacity.rps:,.0f} req/s** (64 connections, {capacity.errors} errors),
{capacity.rps / best:.0f}× funnelgate's best.

{table(["conns", "server", "req/s", "p50", "p99", "CPU µs/req", "calls per Graph request"], rows)}

Throughput against the bare forwarder, same run:

{table(["conns", "funnelgate", "funnelgate, coalesce off", "target"], ratio_rows)}

Errors (non-2xx, socket errors, timeouts): {", ".join(f"{LABELS[n]} {errors[n]}" for n in TARGETS)}.
Nothing answered 200 went undelivered: the fake Graph counted {fg_events:,} funnelgate events
for {fg_calls:,} calls completed in the timed runs (more events: calls still in flight when a
run's clock stopped).

Latency added at half load: funnelgate and the forwarder each driven at ~{half_rate:,.0f}
req/s (half funnelgate's best) for {half_seconds:g} s × {repeats}: {PACED_CONNECTIONS} connections,
each waiting a random 0.5–1.5× think time between requests (wrk's `delay()`), so requests are
spread out, not queued (wrk2's fixed-rate mode is not packaged in Debian). Medians:

{table(["server", "achieved req/s", "p50", "p99", "CPU µs/req"], half_rows)}

Target p99 added ≤ {ADDED_P99_TARGET_MS:g} ms: {verdict(added99 <= ADDED_P99_TARGET_MS)}.
"""
    return Result(markdown, half_rate, targets)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per point (default 5)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--half-seconds", type=float, default=5.0)
    parser.add_argument("--write", type=Path, help="put the tables into this Markdown file")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.repeats, args.half_seconds)
    print(result.markdown)
    if args.write:
        write_section(args.write, "e2e", result.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
