"""Shared benchmark plumbing: the event mix, the machine record, processes, load, /proc stats.

Every process started here is a child of the benchmark, bound to 127.0.0.1, and stopped in a
`finally` (terminate, then kill). Load runs are bounded in time and stop by themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TextIO

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BIN = Path(sys.executable).parent
TOOL = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"
PIXEL = "123456789012345"
PROJECT = "bench-project"
ACCESS_TOKEN = "EAAB-bench-access-token"
MARK = "@@N@@"  # replaced by a per-request counter: unique emails and event ids
PACKAGES = (
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "httpx",
    "aiohttp",
    "orjson",
    "jsonschema",
    "pyjwt",
    "cryptography",
    "facebook-business",
)

# --- the event mix: full customer data, already-hashed input, minimal events -----------------
# Values stay in the domain where funnelgate and the SDK agree (tools/hashing.py docstring):
# names without punctuation, 2-letter states, alpha-2 countries.
_FIRST = ["Joe", "Mary Ann", "José", "Zoë", "Łukasz", "Aiko", "Olivia", "Noah", "Chloé", "Ravi"]
_LAST = ["Smith", "García", "Müller", "Nakamura", "Łukasiewicz", "O Brien", "Dupont", "Rossi"]
_CITY = ["New York", "São Paulo", "St. Louis", "Winston-Salem", "Paris", "Łódź", "Osaka"]
_STATE = ["NY", "ca", " TX ", "WA", "il"]
_COUNTRY = ["US", "us", "GB", "DE", "FR", "JP"]
_EVENT = ["Purchase", "AddToCart", "InitiateCheckout", "ViewContent", "Lead"]
_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0"
KINDS = ("full", "full", "hashed", "minimal")  # the mix: half full, a quarter each of the rest


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def parameters(i: int, tag: str, now: float) -> dict[str, str]:
    """The i-th event of the mix; `tag` goes into the event id and (unhashed) email."""
    kind = KINDS[i % len(KINDS)]
    first, last = _FIRST[i % len(_FIRST)], _LAST[i % len(_LAST)]
    when = datetime.fromtimestamp(now - 60 - i % 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    base = {"pixel": PIXEL, "eventName": _EVENT[i % len(_EVENT)], "eventId": f"evt-{tag}"}
    if kind == "minimal":
        return {
            **base,
            "actionSource": "system_generated",
            "customerEmail": f"lead.{tag}@example.com",
        }
    web = {
        "actionSource": "website",
        "eventTime": when,
        "eventSourceUrl": f"https://shop.example.com/p/{i}",
        "customerClientUserAgent": _UA,
        "customerClientIpAddress": f"203.0.113.{i % 250}",
        "browserId": f"fb.1.1700000000000.{1000 + i}",
    }
    if kind == "hashed":
        email = f"{first}.{last}.{i}@example.com".lower().replace(" ", "")
        return {
            **base,
            **web,
            "customerEmail": sha256(email),
            "customerFirstName": sha256(first.lower()).upper(),
            "customerLastName": sha256(last.lower()),
        }
    local = f"{first}.{last}".replace(" ", "")
    return {
        **base,
        **web,
        "customerEmail": f" {local}.{tag}@Example.COM",
        "customerFirstName": first,
        "customerLastName": last,
        "customerCity": _CITY[i % len(_CITY)],
        "customerState": _STATE[i % len(_STATE)],
        "customerCountryCode": _COUNTRY[i % len(_COUNTRY)],
        "customerExternalId": f"CRM-{tag}",
        "clickId": f"fb.1.1700000000000.IwAR{i}x",
        "contentId": "SKU-1,SKU-2" if i % 3 else "['SKU-9']",
        "contentName": "Lettuce",
        "contentCategory": "Grocery",
    }


def run_tool_templates(count: int, now: float) -> list[list[str]]:
    """Run Tool bodies split at MARK: join a template with a counter to get a unique body."""
    return [
        json.dumps({"tool": TOOL, "parameters": parameters(i, MARK, now)}).split(MARK)
        for i in range(count)
    ]


# --- reporting -------------------------------------------------------------------------------


def machine() -> str:
    """One Markdown paragraph: cores, CPU, OS, Python, library and wrk versions."""
    model = "unknown CPU"
    with Path("/proc/cpuinfo").open() as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    load = wrk_version() or "Python load generator (wrk not found)"
    return (
        f"Machine: {os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; {', '.join(versions)}; load: {load}."
    )


def wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stdout + out.stderr).split(" Copyright")[0].strip() or "wrk"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def write_section(path: Path, name: str, markdown: str) -> None:
    """Replace the text between `<!-- begin NAME -->` and `<!-- end NAME -->` (or append it);
    everything else in the file, such as a hand-written analysis, is kept."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5,
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def spawn(
    stack: ExitStack,
    name: str,
    args: list[str],
    ready_url: str,
    *,
    log: TextIO | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a process, stopped when `stack` closes; return once `ready_url` answers 200."""
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL, env=env, cwd=REPO
    )
    stack.callback(stop, process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready")
        try:
            if http("GET", ready_url, timeout=1)[0] == 200:
                return process
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not become ready in 30 s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass
class Servers:
    graph_url: str = ""
    funnelgate_url: str = ""
    forwarder_url: str = ""
    token: str = ""
    funnelgate: subprocess.Popen[bytes] | None = None
    forwarder: subprocess.Popen[bytes] | None = None
    uncoalesced_url: str = ""
    uncoalesced: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def tool_path(self) -> str:
        return f"/projects/{PROJECT}/tools"


def write_key_pair(root: Path) -> bytes:
    """A new RSA key pair for a project: the public half in root/project.pub.pem, the private
    half (PEM) returned, to sign user tokens with."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (root / "project.pub.pem").write_bytes(public)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@contextmanager
def servers(*, forwarder: bool = False, uncoalesced: bool = False) -> Iterator[Servers]:
    """A fake Graph, a real `funnelgate serve` (logs on, to a file), optionally a second one with
    `graph.coalesce = false` and the bare forwarder, all on 127.0.0.1; everything is stopped
    and deleted on exit."""
    from server.tokens import mint_user_token

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="funnelgate-bench-") as tmp:
        root = Path(tmp)
        found = Servers()
        port = free_port()
        found.graph_url = f"http://127.0.0.1:{port}"
        graph_args = [sys.executable, str(BENCH_DIR / "fakegraph.py"), "--port", str(port)]
        spawn(stack, "fake Graph", graph_args, f"{found.graph_url}/stats")

        private = write_key_pair(root)
        project = (
            f'[[projects]]\nid = "{PROJECT}"\njwt_public_key_file = "project.pub.pem"\n'
            f'facebook_access_token = "{ACCESS_TOKEN}"\n'
        )
        (root / "funnelgate.toml").write_text(project)
        (root / "uncoalesced.toml").write_text(f"[graph]\ncoalesce = false\n\n{project}")
        found.token = mint_user_token(private, PROJECT, "bench-user", ttl_seconds=4 * 3600)
        env = {**os.environ, "FUNNELGATE_GRAPH_BASE_URL": found.graph_url}
        env.pop("FUNNELGATE_CONFIG", None)

        def funnelgate(config: str, log_name: str) -> tuple[str, subprocess.Popen[bytes]]:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = stack.enter_context((root / log_name).open("w"))
            args = [
                str(BIN / "funnelgate"),
                "serve",
                "--config",
                str(root / config),
                "--port",
                str(port),
            ]
            return url, spawn(stack, "funnelgate", args, f"{url}/healthz", log=log, env=env)

        found.log_path = root / "funnelgate.log"
        found.funnelgate_url, found.funnelgate = funnelgate("funnelgate.toml", "funnelgate.log")
        if uncoalesced:
            found.uncoalesced_url, found.uncoalesced = funnelgate(
                "uncoalesced.toml", "uncoalesced.log"
            )
        if forwarder:
            port = free_port()
            found.forwarder_url = f"http://127.0.0.1:{port}"
            args = [
                sys.executable,
                str(BENCH_DIR / "forwarder.py"),
                "--port",
                str(port),
                "--graph-url",
                found.graph_url,
            ]
            found.forwarder = spawn(stack, "forwarder", args, f"{found.forwarder_url}/healthz")
        yield found


def graph_received(found: Servers) -> tuple[int, int]:
    """(requests, events) the fake Graph has received so far."""
    stats = http("GET", f"{found.graph_url}/stats")[1]
    return int(stats["received"]), int(stats["events"])


def smoke(base_url: str, found: Servers, now: float, *, mapped: bool = True) -> None:
    """One call per kind of event must answer 200 (and with events_received 1 when the server
    maps parameters to CAPI events: the fake Graph counts `event_name` keys), before any load."""
    for i in range(len(KINDS)):
        body = json.dumps({"tool": TOOL, "parameters": parameters(i, f"smoke{i}", now)})
        status, answer = http(
            "POST", base_url + found.tool_path(), body.encode(), auth_headers(found.token)
        )
        if status != 200 or answer.get("events_received") != int(mapped):
            raise RuntimeError(f"{base_url}: smoke call {KINDS[i]} answered {status} {answer}")


def auth_headers(token: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}


# --- /proc -----------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """The process and its descendants (uvicorn --workers would fork children)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        for child in children:
            pids += _tree(int(child))
    return pids


def rss_mb(pid: int) -> float:
    total_kb = 0
    for each in _tree(pid):
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def cpu_seconds(pid: int) -> float:
    ticks = 0
    for each in _tree(pid):
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


# --- load ------------------------------------------------------------------------------------


@dataclass
class Load:
    """One load run's result; latencies in milliseconds."""

    requests: int
    seconds: float
    p50: float
    p99: float
    errors: int  # non-2xx/3xx answers, connect/read/write errors, timeouts
    server_cpu_us: float = 0.0  # server process CPU time per request, when measured

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


@dataclass(frozen=True)
class Pacing:
    """Think time between a connection's requests, uniform in [low, high] ms: ~fixed rate."""

    low: int
    high: int

    @classmethod
    def for_rate(cls, rate: float, connections: int, latency_ms: float) -> Pacing:
        mean = max(1, round(connections / rate * 1000 - latency_ms))
        return cls(mean // 2, mean - mean // 2 + mean)


def _lua(
    path: str, templates: list[list[str]], headers: dict[str, str], pacing: Pacing | None
) -> str:
    def lua_string(text: str) -> str:
        assert "]==]" not in text
        return f"[==[{text}]==]"

    bodies = ",\n".join("{" + ", ".join(map(lua_string, parts)) + "}" for parts in templates)
    header_table = ", ".join(f"[ {lua_string(k)} ] = {lua_string(v)}" for k, v in headers.items())
    delay = (
        f"function delay() return math.random({pacing.low}, {pacing.high}) end" if pacing else ""
    )
    return f"""
local bodies = {{{bodies}}}
local headers = {{{header_table}}}
local n = 0
local prefix = ""
local threads = 0
function setup(thread) thread:set("tid", threads); threads = threads + 1 end
function init(args) prefix = (args[1] or "r") .. "t" .. tostring(tid or 0) .. "n" end
function request()
  n = n + 1
  local body = table.concat(bodies[n % #bodies + 1], prefix .. n)
  return wrk.format("POST", {lua_string(path)}, headers, body)
end
{delay}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests": %d, "us": %d, "p50": %d, "p99": %d, "errors": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def _wrk_args(
    url: str,
    path: str,
    templates: list[list[str]],
    headers: dict[str, str],
    connections: int,
    seconds: float,
    pacing: Pacing | None,
    script_dir: Path,
) -> list[str]:
    script = script_dir / f"load-{random.getrandbits(32):08x}.lua"
    script.write_text(_lua(path, templates, headers, pacing))
    wrk = shutil.which("wrk") or "wrk"
    return [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
        "--",
        f"r{random.getrandbits(32):x}",
    ]


def _parse_wrk(output: str) -> Load:
    found = re.search(r"^BENCHJSON (.*)$", output, re.MULTILINE)
    if found is None or ".lua:" in output:  # a script error: wrk would carry on with GETs
        raise RuntimeError(f"wrk printed no result:\n{output}")
    raw = json.loads(found.group(1))
    return Load(
        raw["requests"], raw["us"] / 1e6, raw["p50"] / 1000, raw["p99"] / 1000, raw["errors"]
    )


def run_load(
    url: str,
    path: str,
    templates: list[list[str]],
    headers: dict[str, str],
    *,
    connections: int,
    seconds: float,
    pacing: Pacing | None = None,
    server_pid: int | None = None,
) -> Load:
    """Drive url+path for `seconds` (closed loop, or paced), with wrk if present."""
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    if shutil.which("wrk"):
        with tempfile.TemporaryDirectory(prefix="funnelgate-wrk-") as tmp:
            args = _wrk_args(url, path, templates, headers, connections, seconds, pacing, Path(tmp))
            out = subprocess.run(
                args, capture_output=True, text=True, timeout=seconds + 60, check=True
            )
        result = _parse_wrk(out.stdout + out.stderr)
    else:
        result = asyncio.run(
            python_load(url + path, templates, headers, connections, seconds, pacing)
        )
    if server_pid and result.requests:
        result.server_cpu_us = (cpu_seconds(server_pid) - cpu_before) / result.requests * 1e6
    return result


@contextmanager
def background_load(
    url: str,
    path: str,
    templates: list[list[str]],
    headers: dict[str, str],
    *,
    connections: int,
    seconds: float,
    pacing: Pacing | None,
) -> Iterator[list[Load]]:
    """Load in the background for `seconds` (wrk, or the Python generator in a thread); the
    list holds the result once the block ends (the block waits for the load to finish)."""
    result: list[Load] = []
    if not shutil.which("wrk"):
        args = (url + path, templates, headers, connections, seconds, pacing)
        thread = threading.Thread(target=lambda: result.append(asyncio.run(python_load(*args))))
        thread.start()
        try:
            yield result
        finally:
            thread.join(timeout=seconds + 60)
        return
    with tempfile.TemporaryDirectory(prefix="funnelgate-wrk-") as tmp:
        args = _wrk_args(url, path, templates, headers, connections, seconds, pacing, Path(tmp))
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            yield result
            out, err = process.communicate(timeout=seconds + 60)
            result.append(_parse_wrk(out + err))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


async def python_load(
    url: str,
    templates: list[list[str]],
    headers: dict[str, str],
    connections: int,
    seconds: float,
    pacing: Pacing | None,
) -> Load:
    """The fallback generator (aiohttp), same semantics as the wrk script."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    prefix = f"p{random.getrandbits(32):x}n"
    counter = iter(range(1 << 62))
    started = time.perf_counter()
    deadline = started + seconds

    async def connection(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            n = next(counter)
            body = (prefix + str(n)).join(templates[n % len(templates)])
            sent = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as answer:
                    await answer.read()
                    errors += answer.status >= 400
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            latencies.append(time.perf_counter() - sent)
            if pacing:
                await asyncio.sleep(random.randint(pacing.low, pacing.high) / 1000)

    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(connection(session) for _ in range(connections)))
    elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return Load(len(latencies), elapsed, cuts[49] * 1000, cuts[98] * 1000, errors)
