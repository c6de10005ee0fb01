"""Where funnelgate's CPU goes per request under load: py-spy on the `funnelgate serve` process.

wrk drives funnelgate (closed loop) while `py-spy record --nonblocking` samples it; each CPU
sample is charged to the innermost frame that belongs to a known component (JWT, jsonschema,
hashing, logging, the HTTP client, uvicorn, ...), and shares become µs per request with the
process's measured CPU time per request. Needs py-spy (bench/requirements.txt).

    .venv/bin/python bench/hotpath.py [--seconds 15] [--connections 64] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    BIN,
    auth_headers,
    background_load,
    cpu_seconds,
    graph_received,
    machine,
    run_load,
    run_tool_templates,
    servers,
    smoke,
    table,
    write_section,
)

# (component, file-path fragments); a frame takes the first component that matches.
COMPONENTS = [
    (
        "JWT verify (pyjwt, cryptography, server/auth.py)",
        ("/jwt/", "/cryptography/", "/server/auth.py"),
    ),
    (
        "jsonschema validation (+ server/validation.py)",
        ("/jsonschema/", "/referencing/", "/rpds", "/server/validation.py"),
    ),
    (
        "normalise + SHA-256 (tools/hashing.py, pycountry)",
        ("/tools/hashing.py", "/pycountry/", "/phonenumbers/", "/hashlib"),
    ),
    ("map + Meta rules (tools/ other)", ("/tools/",)),
    ("logging (server/logs.py, stdlib logging)", ("/logging/", "/server/logs.py")),
    ("outbound: httpx", ("/httpx/", "/httpcore/")),
    ("outbound: aiohttp", ("/aiohttp/", "/yarl/", "/multidict/")),
    ("Graph client (server/delivery/)", ("/server/delivery/",)),
    ("starlette (routing, request, response)", ("/starlette/", "/anyio/")),
    ("uvicorn + httptools (HTTP server)", ("/uvicorn/", "/httptools/")),
    ("funnelgate routes, runner, app, storage", ("/server/",)),
    ("event loop, sockets (uvloop/asyncio, no Python frame)", ("/asyncio/", "/uvloop/")),
]
# Inclusive: a sample counts if any frame is one of these functions (qualified names, file).
FUNCTIONS = [
    ("RequestLog middleware, whole request", ("RequestLog.__call__",), "/server/app.py"),
    (
        "user token check (cache or JWT verify)",
        ("VerifiedTokens.verify", "_verify"),
        "/server/auth.py",
    ),
    ("read_json_body (body + orjson.loads)", ("read_json_body",), "/server/bodies.py"),
    ("ParameterValidator.check", ("ParameterValidator.check",), "/server/validation.py"),
    ("tool.build (map, rules, hashing)", ("build_event",), "/tools/"),
    ("  of which hash_value", ("hash_value",), "/tools/hashing.py"),
    ("GraphClient.send (client + attempt log)", ("GraphClient.send",), "/server/delivery/"),
    ("server.logs.log (both log lines)", ("log",), "/server/logs.py"),
]
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*):\d+\)$")


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for text in stack.split(";"):
        found = _FRAME.match(text)
        name, file = (found["name"], "/" + found["file"].lstrip("/")) if found else (text, "")
        frames.append((name, file))
    return frames


def attribute(raw: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """(samples per component, samples per function, total) from py-spy's raw output."""
    components: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = _frames(stack)
        component = next(
            (
                label
                for _, file in reversed(frames)
                for label, parts in COMPONENTS
                if any(p in file for p in parts)
            ),
            "other",
        )
        components[component] += count
        for label, names, part in FUNCTIONS:
            if any(n in names and part in f for n, f in frames):
                functions[label] += count
    return components, functions, total


@dataclass
class Result:
    markdown: str


def run(
    seconds: float = 15.0, connections: int = 64, rate_hz: int = 200, raw_copy: Path | None = None
) -> Result:
    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install -r bench/requirements.txt")
    now = time.time()
    templates = run_tool_templates(64, now)
    with servers() as found, tempfile.TemporaryDirectory(prefix="funnelgate-pyspy-") as tmp:
        assert found.funnelgate is not None
        pid = found.funnelgate.pid
        headers = auth_headers(found.token)
        smoke(found.funnelgate_url, found, now)
        run_load(
            found.funnelgate_url, found.tool_path(), templates, headers, connections=8, seconds=2
        )
        out = Path(tmp) / "profile.txt"
        with background_load(
            found.funnelgate_url,
            found.tool_path(),
            templates,
            headers,
            connections=connections,
            seconds=seconds + 4,
            pacing=None,
        ) as load:
            time.sleep(2)
            cpu_before, (posts_before, calls_before) = cpu_seconds(pid), graph_received(found)
            subprocess.run(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    str(rate_hz),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--nonblocking",
                ],
                capture_output=True,
                timeout=seconds + 60,
                check=True,
            )
            posts, calls = graph_received(found)
            posts, calls = posts - posts_before, calls - calls_before  # an event per call
            cpu_per_request = (cpu_seconds(pid) - cpu_before) / calls * 1e6
        components, functions, total = attribute(out.read_text())
        if raw_copy:
            shutil.copy(out, raw_copy)

    sample_us = 1e6 / rate_hz / calls  # one sample's worth of CPU, per request

    def row(label: str, count: int) -> list[str]:
        return [label, f"{count / total:.1%}", f"{count * sample_us:.0f}"]

    component_rows = [row(label, n) for label, n in components.most_common()]
    unseen = cpu_per_request - total * sample_us
    component_rows.append(
        ["(CPU py-spy did not sample: kernel time in calls it counts as idle)", "", f"{unseen:.0f}"]
    )
    function_rows = [row(label, functions[label]) for label, _, _ in FUNCTIONS]
    markdown = f"""## Hot path profile: where funnelgate's CPU goes per request

Command: `.venv/bin/python bench/hotpath.py --seconds {seconds:g} --connections {connections}`

{machine()}

wrk at {connections} connections: {load[0].rps:,.0f} req/s, {load[0].errors} errors. During the
{seconds:g} s of `py-spy record --nonblocking --rate {rate_hz}` ({calls:,} calls, {total:,} on-CPU
samples; {calls / posts:.1f} calls per Graph request) the server process used
**{cpu_per_request:.0f} µs CPU per request** (user+system, /proc). µs/request = samples ×
{1000 / rate_hz:g} ms / calls.

Exclusive: each sample is charged to the innermost frame that belongs to a component (a stdlib
or C call is charged to its caller's component):

{table(["component", "share", "µs/request"], component_rows)}

Inclusive (a sample counts for every listed function on its stack):

{table(["function", "share", "µs/request"], function_rows)}
"""
    return Result(markdown)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument("--write", type=Path, help="put the tables into this Markdown file")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.connections, raw_copy=args.raw)
    print(result.markdown)
    if args.write:
        write_section(args.write, "profile", result.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
