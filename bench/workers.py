"""serve --workers 1 vs 2 on SQLite, sync and queued: wrk at 64 connections, interleaved
(1, 2, 2, 1 after a warm-up), 10 s each; req/s, p50, p99, server CPU µs per call (the whole
process tree). Run from the repo: .venv/bin/python bench/workers.py [SECONDS] [sync,queued]"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path.cwd() / "bench"))
from benchlib import BENCH_DIR, BIN, free_port, run_load, run_tool_templates, spawn
from queued import Gate

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
CONNECTIONS = 64
MODES = sys.argv[2].split(",") if len(sys.argv) > 2 else ["sync", "queued"]


def main() -> None:
    with ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="funnelgate-workers-bench-"))
        graph = f"http://127.0.0.1:{free_port()}"
        spawn(
            stack,
            "fake Graph",
            [sys.executable, str(BENCH_DIR / "fakegraph.py"), "--port", graph.rsplit(":", 1)[1]],
            f"{graph}/stats",
        )
        bodies = run_tool_templates(64, time.time())
        for mode in MODES:
            servers = {}
            for workers in (1, 2):
                gate = Gate(stack, root / f"{mode}-{workers}", graph, delivery={"mode": mode})
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                args = [
                    str(BIN / "funnelgate"),
                    "serve",
                    "--config",
                    str(gate.config),
                    "--port",
                    str(port),
                    "--workers",
                    str(workers),
                ]
                process = spawn(
                    stack, f"{mode}-{workers}", args, f"{url}/healthz", log=gate.log, env=gate.env
                )
                time.sleep(3)  # every worker up
                servers[workers] = (url, process.pid, gate)
            results: dict[int, list[tuple[float, float, float, float]]] = {1: [], 2: []}
            for order, workers in enumerate((1, 2, 2, 1, 1, 2)):
                url, pid, gate = servers[workers]
                seconds = 3 if order < 2 else SECONDS
                load = run_load(
                    url,
                    gate.path,
                    bodies,
                    gate.headers,
                    server_pid=pid,
                    connections=CONNECTIONS,
                    seconds=seconds,
                )
                if load.errors:
                    print(f"{mode} {workers}: {load.errors} errors", flush=True)
                if order >= 2:
                    results[workers].append(
                        (load.requests / load.seconds, load.p50, load.p99, load.server_cpu_us)
                    )
                print(
                    f"{mode} workers={workers} {seconds:g}s: {load.requests / load.seconds:,.0f} "
                    f"req/s p50 {load.p50:.1f} ms p99 {load.p99:.1f} ms "
                    f"cpu {load.server_cpu_us:.0f} µs/call errors {load.errors}",
                    flush=True,
                )
            for workers, rows in results.items():
                med = [statistics.median(col) for col in zip(*rows, strict=True)]
                print(
                    f"| {mode} | {workers} | {med[0]:,.0f} | {med[1]:.1f} | {med[2]:.1f} | "
                    f"{med[3]:.0f} |",
                    flush=True,
                )
            for workers in (1, 2):
                servers[workers][2].process = None


if __name__ == "__main__":
    main()
