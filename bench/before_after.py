"""What a change cost on the sync hot path: this checkout's `funnelgate serve` against another
checkout's (e.g. `git worktree add /tmp/before <rev>`), and both against the bare forwarder,
interleaved in one run at one concurrency; medians of the repetitions.

Both servers run on this checkout's virtualenv, each importing its own `server/` and `tools/`
(PYTHONPATH), with the same config shape and the same fast fake Graph.

    .venv/bin/python bench/before_after.py --before /tmp/before [--connections 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from benchlib import BENCH_DIR, REPO, free_port, run_load, run_tool_templates, spawn
from queued import Gate

SERVE = "import sys; from server.cli import main; sys.exit(main())"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="funnelgate-ab-"))
        graph = f"http://127.0.0.1:{free_port()}"
        spawn(stack, "fake Graph", [sys.executable, str(BENCH_DIR / "fakegraph.py"), "--port",
              graph.rsplit(":", 1)[1]], f"{graph}/stats")  # fmt: skip
        forwarder = f"http://127.0.0.1:{free_port()}"
        fw = spawn(stack, "forwarder", [sys.executable, str(BENCH_DIR / "forwarder.py"),
                   "--port", forwarder.rsplit(":", 1)[1], "--graph-url", graph],
                   f"{forwarder}/healthz")  # fmt: skip
        targets = {"forwarder": (forwarder, fw.pid, None)}
        for name, checkout in (("before", args.before.resolve()), ("after", REPO)):
            gate = Gate(stack, root / name, graph)
            url = f"http://127.0.0.1:{free_port()}"
            process = spawn(
                stack, name,
                [sys.executable, "-c", SERVE, "serve", "--config", str(gate.config), "--port",
                 url.rsplit(":", 1)[1]],
                f"{url}/healthz", log=gate.log, env={**gate.env, "PYTHONPATH": str(checkout)},
            )  # fmt: skip
            targets[name] = (url, process.pid, gate)
        some_gate = targets["after"][2]
        assert some_gate is not None
        bodies = run_tool_templates(64, time.time())
        rates: dict[str, list[float]] = {name: [] for name in targets}
        cpu: dict[str, list[float]] = {name: [] for name in targets}
        for rep in range(args.repeats + 1):
            names = list(targets) if rep % 2 else list(reversed(targets))
            for name in names:
                url, pid, gate = targets[name]
                headers = (gate or some_gate).headers
                load = run_load(url, some_gate.path, bodies, headers, server_pid=pid,
                                connections=args.connections, seconds=args.seconds)  # fmt: skip
                if load.errors:
                    raise RuntimeError(f"{name}: {load.errors} errors")
                if rep:  # the first round warms up
                    rates[name].append(load.requests / args.seconds)
                    cpu[name].append(load.server_cpu_us or 0.0)
        base = statistics.median(rates["forwarder"])
        print(f"{args.connections} connections, {args.repeats} × {args.seconds:g} s, medians")
        print("| server | req/s | vs forwarder | CPU µs/call |\n|---|---|---|---|")
        for name in ("before", "after", "forwarder"):
            rate = statistics.median(rates[name])
            print(f"| {name} | {rate:,.0f} | {rate / base:.2f}× | "
                  f"{statistics.median(cpu[name]):.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
