"""A fake Graph /events edge with faults, run as its own process, for durability tests and
benchmarks: it outlives a `kill -9` of funnelgate and keeps counting what Meta accepted.

    python -m tests.faultgraph --port 0     # prints "listening on PORT" once ready

`POST /{version}/{pixel}/events` answers as Meta does (server/sandbox.py's SandboxGraph: one
invalid event refuses the whole request with 400, a missing access token is code 190), unless a
fault set through the control API decides otherwise:

- `POST /_control` with a JSON object changes the faults (keys absent stay as they are;
  `"defaults": true` first restores every default): `latency` [low, high] seconds before every
  answer; `hang` (never answer); `throttle_seconds` (Meta's throttling error, `throttle_code`
  with HTTP `throttle_status`, for that long from now); `fail_rate` (HTTP 500, Meta's
  transient error, with that probability); `reset_rate` (connection reset by peer);
  `bad_event_ids` / `bad_event_names` (a request holding one of them is refused whole, as
  Meta refuses a batch for one bad event); `refused_tokens` (code 190); `check` (false skips
  Meta's per-event rules, for benchmark speed).
- `GET /_stats` answers the counters; `?copies=1` adds how many times each event_id was
  accepted, `?log=1` the request log `[received_at, pixel, token fingerprint, events,
  outcome]` (wall clock, so a test can line it up with its own times).
- `POST /_reset` restores the default faults and clears every counter.

The outcome of a request is decided when it arrives, and an accepted request counts as
accepted then, before the latency: a client that times out during the latency has still had
its events accepted, as with Meta (the issue's "accepted ~5.5 times" measurement).
Graph's error shapes: https://developers.facebook.com/docs/graph-api/guides/error-handling;
throttling codes (4, 17, 32, 613, 80004):
https://developers.facebook.com/docs/graph-api/overview/rate-limiting.

`FaultGraph` starts the process on a free port, waits until it is ready, talks to the control
API and stops the process (terminate, then kill) when its block ends.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import select
import socket
import struct
import subprocess
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson

REPO = Path(__file__).resolve().parent.parent
MAX_BODY_BYTES = 16 * 1024 * 1024  # 1,000 events with full customer data fit easily
MAX_LOG = 200_000  # request-log entries kept (oldest dropped)
MAX_TRACKED_EVENTS = 2_000_000  # distinct event ids counted; past it, new ids are not tracked
_THROTTLE_MESSAGES = {
    4: "Application request limit reached",
    17: "User request limit reached",
    32: "Page request limit reached",
    613: "Calls to this api have exceeded the rate limit.",
    80004: "There have been too many calls to this ad-account. Wait a bit and try again.",
}


@dataclass
class Faults:
    latency: tuple[float, float] = (0.0, 0.0)
    hang: bool = False
    throttle_until: float = 0.0  # wall clock
    throttle_code: int = 4
    throttle_status: int = 400
    fail_rate: float = 0.0
    reset_rate: float = 0.0
    bad_event_ids: frozenset[str] = frozenset()
    bad_event_names: frozenset[str] = frozenset()
    refused_tokens: frozenset[str] = frozenset()
    check: bool = True

    def update(self, changes: Any) -> None:
        """Apply a control request's changes; ValueError names what is wrong."""
        if not isinstance(changes, dict):
            raise ValueError("the body must be a JSON object")
        if changes.get("defaults") is True:
            self.__dict__.update(Faults().__dict__)
        for key, value in changes.items():
            if key == "defaults":
                continue
            if key == "latency":
                low, high = (float(v) for v in value)
                if not 0 <= low <= high <= 3600:
                    raise ValueError("latency must be [low, high] with 0 <= low <= high")
                self.latency = (low, high)
            elif key == "throttle_seconds":
                self.throttle_until = time.time() + float(value)
            elif key in ("fail_rate", "reset_rate"):
                if not 0 <= float(value) <= 1:
                    raise ValueError(f"{key} must be within [0, 1]")
                setattr(self, key, float(value))
            elif key in ("throttle_code", "throttle_status"):
                setattr(self, key, int(value))
            elif key in ("hang", "check"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false")
                setattr(self, key, value)
            elif key in ("bad_event_ids", "bad_event_names", "refused_tokens"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{key} must be a list of strings")
                setattr(self, key, frozenset(value))
            else:
                raise ValueError(f"unknown fault {key!r}")


@dataclass
class Stats:
    requests: int = 0
    events: int = 0  # events in every request received, whatever the outcome
    outcomes: Counter[str] = field(default_factory=Counter)
    copies: dict[str, int] = field(default_factory=dict)  # event_id -> times accepted
    log: deque[tuple[float, str, str, int, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_LOG)
    )
    in_flight: int = 0
    max_in_flight: int = 0

    def public(self, *, copies: bool, log: bool) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "requests": self.requests,
            "events": self.events,
            "outcomes": dict(self.outcomes),
            "accepted_events": sum(self.copies.values()),
            "distinct_accepted": len(self.copies),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }
        if copies:
            answer["copies"] = self.copies
        if log:
            answer["log"] = list(self.log)
        return answer


def _error(code: int, message: str, *, transient: bool = False, **extra: Any) -> bytes:
    error = {"message": f"(#{code}) {message}", "type": "OAuthException", "code": code,
             "is_transient": transient, "fbtrace_id": "fault-" + random.randbytes(6).hex(),
             **extra}  # fmt: skip
    return orjson.dumps({"error": error})


def _fingerprint(token: Any) -> str:
    return hashlib.sha256(str(token).encode()).hexdigest()[:12] if token else ""


class FaultGraphApp:
    """The fault Graph's state and its request handling (aiohttp)."""

    def __init__(self) -> None:
        from server.sandbox import SandboxGraph

        self.faults = Faults()
        self.stats = Stats()
        self.sandbox = SandboxGraph(keep=1)

    def decide(self, pixel: str, version: str, body: Any) -> tuple[str, int, bytes]:
        """(outcome, status, answer) for one /events request, counting what is accepted."""
        faults = self.faults
        if faults.fail_rate and random.random() < faults.fail_rate:
            message = "An unexpected error has occurred. Please retry your request later."
            return "failed", 500, _error(2, message, transient=True)
        if time.time() < faults.throttle_until:
            code = faults.throttle_code
            message = _THROTTLE_MESSAGES.get(code, "Rate limit reached")
            return "throttled", faults.throttle_status, _error(code, message, transient=True)
        if not isinstance(body, dict):
            body = None
        token = body.get("access_token") if body else None
        if isinstance(token, str) and token in faults.refused_tokens:
            message = "Error validating access token: The session has been invalidated."
            return "refused", 400, _error(190, message, error_subcode=460)
        events = body.get("data") if body else None
        if isinstance(events, list) and (faults.bad_event_ids or faults.bad_event_names):
            for index, event in enumerate(events):
                if isinstance(event, dict) and (
                    event.get("event_id") in faults.bad_event_ids
                    or event.get("event_name") in faults.bad_event_names
                ):
                    message = f"Invalid parameter: data[{index}] is not accepted"
                    return "rejected", 400, _error(
                        100, message, error_subcode=2804019,
                        error_user_title="Invalid event", error_user_msg=message,
                    )  # fmt: skip
        if faults.check:
            status, answer = self.sandbox.handle(version, pixel, body)
            if status != 200:
                return "invalid", status, orjson.dumps(answer)
        elif not isinstance(events, list):
            return "invalid", 400, _error(100, "The parameter data is required")
        assert isinstance(events, list)
        copies = self.stats.copies
        for event in events:
            event_id = str(event.get("event_id")) if isinstance(event, dict) else "?"
            if event_id in copies:
                copies[event_id] += 1
            elif len(copies) < MAX_TRACKED_EVENTS:
                copies[event_id] = 1
        answer = {"events_received": len(events), "messages": [],
                  "fbtrace_id": "fault-" + random.randbytes(6).hex()}  # fmt: skip
        return "accepted", 200, orjson.dumps(answer)

    def app(self) -> Any:
        from aiohttp import web

        async def events(request: web.Request) -> web.StreamResponse:
            stats, faults = self.stats, self.faults
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            try:
                raw = await request.read()
                try:
                    body = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    body = None
                data = body.get("data") if isinstance(body, dict) else None
                count = len(data) if isinstance(data, list) else 0
                token = body.get("access_token") if isinstance(body, dict) else None
                pixel, version = request.match_info["pixel"], request.match_info["version"]
                stats.requests += 1
                stats.events += count
                received_at = time.time()
                if faults.reset_rate and random.random() < faults.reset_rate:
                    outcome, status, answer = "reset", 0, b""
                elif faults.hang:
                    outcome, status, answer = "hung", 0, b""
                else:
                    outcome, status, answer = self.decide(pixel, version, body)
                stats.outcomes[outcome] += 1
                stats.log.append((received_at, pixel, _fingerprint(token), count, outcome))
                if outcome == "reset":
                    _reset(request)
                    raise ConnectionResetError("reset by the fault Graph")
                if outcome == "hung":
                    await asyncio.Event().wait()  # until the client goes (handler cancelled)
                low, high = faults.latency
                if high:
                    await asyncio.sleep(random.uniform(low, high))
                return web.Response(body=answer, status=status, content_type="application/json")
            finally:
                stats.in_flight -= 1

        async def control(request: web.Request) -> web.Response:
            try:
                self.faults.update(orjson.loads(await request.read()))
            except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
                return web.json_response({"message": str(exc)}, status=400)
            return web.json_response({"status": "ok"})

        async def stats(request: web.Request) -> web.Response:
            public = self.stats.public(
                copies=request.query.get("copies") == "1", log=request.query.get("log") == "1"
            )
            return web.Response(body=orjson.dumps(public), content_type="application/json")

        async def reset(_: web.Request) -> web.Response:
            self.faults, self.stats = Faults(), Stats()
            return web.json_response({"status": "ok"})

        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/{version}/{pixel}/events", events)
        app.router.add_post("/_control", control)
        app.router.add_get("/_stats", stats)
        app.router.add_post("/_reset", reset)
        return app


def _reset(request: Any) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0), as a peer that drops it does."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def serve(port: int) -> None:
    from aiohttp import web

    # Cancel a handler when its client goes, so hung requests do not pile up.
    runner = web.AppRunner(FaultGraphApp().app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"listening on {bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.port))


class FaultGraph:
    """The fault Graph as a child process, for `with FaultGraph() as graph:`.

    `graph.base_url` is its root (set as `[graph] base_url`); `control`, `stats`, `reset` use
    its control API. The process is stopped when the block ends, whatever happened in it.
    """

    def __init__(self, *, ready_seconds: float = 15.0) -> None:
        self.ready_seconds = ready_seconds
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self._http: httpx.Client | None = None

    def __enter__(self) -> FaultGraph:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faultgraph", "--port", "0"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            port = self._read_port(self.process)
            self.base_url = f"http://127.0.0.1:{port}"
            self._http = httpx.Client(base_url=self.base_url, timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _read_port(self, process: subprocess.Popen[bytes]) -> int:
        assert process.stdout is not None
        deadline = time.monotonic() + self.ready_seconds
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or process.poll() is not None:
                raise RuntimeError("the fault Graph did not start")
            if select.select([process.stdout], [], [], left)[0]:
                chunk = process.stdout.read1(256)  # type: ignore[attr-defined]
                if not chunk:
                    raise RuntimeError("the fault Graph exited before it was ready")
                line += chunk
        return int(line.split()[-1])

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()

    @property
    def http(self) -> httpx.Client:
        assert self._http is not None, "the fault Graph is not running"
        return self._http

    def control(self, **faults: Any) -> None:
        answer = self.http.post("/_control", json=faults)
        answer.raise_for_status()

    def reset(self) -> None:
        self.http.post("/_reset").raise_for_status()

    def stats(self, *, copies: bool = False, log: bool = False) -> dict[str, Any]:
        params = {"copies": "1" if copies else "0", "log": "1" if log else "0"}
        answer = self.http.get("/_stats", params=params)
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    def copies(self) -> dict[str, int]:
        """Per event_id, how many times it was accepted."""
        result: dict[str, int] = self.stats(copies=True)["copies"]
        return result

    def wait_for(self, event_ids: set[str], *, seconds: float) -> set[str]:
        """Until every id in `event_ids` was accepted at least once, or `seconds` passed;
        answers the ids still missing."""
        deadline = time.monotonic() + seconds
        while True:
            missing = event_ids - self.copies().keys()
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)


if __name__ == "__main__":
    main()
