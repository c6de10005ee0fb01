"""3. Memory: RSS of the `funnelgate serve` process before, during and after a long run at a
steady rate, with a unique email and event id in every request.

    .venv/bin/python bench/memory.py [--minutes 5] [--rate 300] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    Pacing,
    auth_headers,
    background_load,
    machine,
    rss_mb,
    run_tool_templates,
    servers,
    smoke,
    table,
    verdict,
    write_section,
)

RSS_TARGET_MB = 150.0
FLAT_MB_PER_MIN = 1.0  # slope over the second half of the run that still counts as flat
CONNECTIONS = 16


@dataclass
class Result:
    markdown: str
    targets: list[tuple[str, str, bool]] = field(default_factory=list)


def slope_mb_per_min(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    return statistics.linear_regression([t for t, _ in samples], [m for _, m in samples]).slope * 60


def run(minutes: float = 5.0, rate: float = 300.0, interval: float = 10.0) -> Result:
    now = time.time()
    seconds = minutes * 60
    templates = run_tool_templates(256, now)
    with servers() as found:
        assert found.funnelgate is not None
        pid = found.funnelgate.pid
        smoke(found.funnelgate_url, found, now)
        before = rss_mb(pid)
        samples: list[tuple[float, float]] = []
        pacing = Pacing.for_rate(rate, CONNECTIONS, latency_ms=2.0)
        with background_load(
            found.funnelgate_url,
            found.tool_path(),
            templates,
            auth_headers(found.token),
            connections=CONNECTIONS,
            seconds=seconds,
            pacing=pacing,
        ) as load:
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds - 1:
                samples.append((elapsed, rss_mb(pid)))
                time.sleep(max(0.0, min(interval * len(samples), seconds - 1) - elapsed))
            samples.append((time.monotonic() - started, rss_mb(pid)))
        time.sleep(5)
        after = rss_mb(pid)

    result = load[0]
    peak = max([before, after, *(m for _, m in samples)])
    half = [s for s in samples if s[0] >= seconds / 2]
    late_slope = slope_mb_per_min(half)
    flat = late_slope <= FLAT_MB_PER_MIN
    rows = [
        ["before (idle, after start-up and one call per kind)", f"{before:.1f}"],
        ["first sample under load", f"{samples[0][1]:.1f}"],
        ["after 1 minute", f"{next((m for t, m in samples if t >= 60), samples[-1][1]):.1f}"],
        ["end of the run", f"{samples[-1][1]:.1f}"],
        ["max", f"**{peak:.1f}**"],
        ["5 s after the load stopped", f"{after:.1f}"],
        ["slope, whole run (MB/min)", f"{slope_mb_per_min(samples):+.2f}"],
        ["slope, second half (MB/min)", f"**{late_slope:+.2f}**"],
    ]
    series = ", ".join(f"{m:.1f}" for _, m in samples)
    markdown = f"""## 3. Memory: funnelgate RSS over a {minutes:g}-minute run

Command: `.venv/bin/python bench/memory.py --minutes {minutes:g} --rate {rate:.0f}`

{machine()}

`funnelgate serve` (logs on, to a file) against the fake Graph, paced at ~{rate:,.0f} req/s
({CONNECTIONS} connections, random think time): {result.requests:,} calls in
{result.seconds:.0f} s = **{result.rps:,.0f} req/s** achieved, {result.errors} errors, p50
{result.p50:.2f} ms, p99 {result.p99:.2f} ms. Every body has a unique email and event id.
VmRSS of the server process (and any children) from /proc, every {interval:g} s.

{table(["RSS", "MB"], rows)}

Samples (MB): {series}

Targets: RSS ≤ {RSS_TARGET_MB:g} MB: {verdict(peak <= RSS_TARGET_MB)} (max {peak:.1f} MB);
flat (second-half slope ≤ {FLAT_MB_PER_MIN:g} MB/min; a leak of 1 KB per call would show as
~{rate * 60 / 1024:.0f} MB/min here): {verdict(flat)}.
"""
    return Result(
        markdown,
        [
            (f"RSS ≤ {RSS_TARGET_MB:g} MB", f"max {peak:.1f} MB", peak <= RSS_TARGET_MB),
            ("RSS flat", f"{late_slope:+.2f} MB/min (second half)", flat),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=300.0, help="requests/s (default 300)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--write", type=Path, help="put the table into this Markdown file")
    args = parser.parse_args(argv)
    result = run(args.minutes, args.rate, args.interval)
    print(result.markdown)
    if args.write:
        write_section(args.write, "memory", result.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
