"""`make bench`: the benchmarks in one go, then every target with its verdict.

Prints Markdown; with --write FILE, also puts each section into FILE between its markers
(`<!-- begin NAME -->` ... `<!-- end NAME -->`), keeping the rest of the file.

    .venv/bin/python bench/run.py [--quick] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import e2e
import map_core
import memory
import pg
import queued
from benchlib import table, verdict, write_section


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in about a minute: short points, a 30 s memory run",
    )
    parser.add_argument("--write", type=Path, help="put the tables into this Markdown file")
    args = parser.parse_args(argv)
    started = time.monotonic()
    sections = [
        ("map_core", lambda: map_core.run(events=1000, repeats=9)),
        (
            "e2e",
            lambda: e2e.run(
                seconds=1 if args.quick else 5,
                repeats=1 if args.quick else 3,
                half_seconds=1 if args.quick else 5,
            ),
        ),
        ("memory", lambda: memory.run(minutes=0.5 if args.quick else 5, rate=300)),
        ("queued", lambda: queued.run(quick=args.quick)),
        ("pg", lambda: pg.run(quick=args.quick)),
    ]
    targets: list[tuple[str, str, bool]] = []
    for name, bench in sections:
        result = bench()
        print(result.markdown, flush=True)
        targets += result.targets
        if args.write:
            write_section(args.write, name, result.markdown)
    summary = f"""## Targets

{table(["target", "measured", "verdict"], [(t, m, verdict(ok)) for t, m, ok in targets])}

`make bench` took {(time.monotonic() - started) / 60:.1f} minutes.
"""
    print(summary)
    if args.write:
        write_section(args.write, "targets", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
