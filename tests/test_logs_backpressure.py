"""A reader of stderr that cannot keep up never slows the server: a real uvicorn process logs
through server.logs while the test reads its stderr at ~8 KB/s and keeps calling /healthz.

The served app is below (run as `python -m tests.test_logs_backpressure`): /flood logs 100 lines
of ~200 bytes, /healthz logs nothing, /done waits for the writer to catch up and answers how many flood lines
were logged in all.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
LINES_PER_FLOOD = 100


class SlowReader(threading.Thread):
    """Reads a pipe 1 KB at a time, 8 times a second, until `fast` is set; then as fast as it can."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.fd = pipe.fileno()
        self.data = bytearray()
        self.fast = threading.Event()

    def run(self) -> None:
        while chunk := os.read(self.fd, 1024 if not self.fast.is_set() else 1 << 16):
            self.data += chunk
            if not self.fast.is_set():
                self.fast.wait(0.125)


@pytest.mark.timeout(60)
def test_a_slow_reader_of_stderr_never_slows_the_server():
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "tests.test_logs_backpressure"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert server.stdout is not None and server.stderr is not None
    reader = SlowReader(server.stderr)
    reader.start()
    flooding = threading.Event()
    latencies: list[float] = []
    try:
        ready, _, _ = select.select([server.stdout], [], [], 15)
        assert ready, "the server did not start"
        base = f"http://127.0.0.1:{int(server.stdout.readline())}"
        with httpx.Client(base_url=base, timeout=5) as http:
            _wait_ready(http)
            flood = threading.Thread(target=_flood, args=(base, flooding), daemon=True)
            flooding.set()
            flood.start()
            time.sleep(0.5)  # the pipe and the buffer fill
            until = time.monotonic() + 3
            while time.monotonic() < until:
                asked = time.perf_counter()
                try:
                    assert http.get("/healthz").status_code == 200
                    latencies.append(time.perf_counter() - asked)
                except httpx.TimeoutException:
                    latencies.append(5.0)
                time.sleep(0.02)
            flooding.clear()
            flood.join(10)
            reader.fast.set()  # the reader catches up: the count of the dropped lines shows
            total = http.get("/done").json()["flood_lines"]
    finally:
        flooding.clear()
        reader.fast.set()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        reader.join(10)
        server.stdout.close()
        server.stderr.close()
    # uvicorn stops on SIGTERM, then dies of it: the handler wrote every line first
    assert server.returncode == -signal.SIGTERM, reader.data[-2000:]
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 0.1, f"/healthz p99 {p99 * 1000:.0f} ms while stderr was read slowly"
    assert len(latencies) > 30, f"only {len(latencies)} /healthz answers in 3 s"
    lines = [json.loads(line) for line in reader.data.splitlines()]
    seen = sum(line["event"] == "flood" for line in lines)
    dropped = sum(line["count"] for line in lines if line["event"] == "log_lines_dropped")
    assert dropped > 0 and seen > 0
    assert seen + dropped == total  # every line is either written or counted
    assert lines[-1]["event"].startswith("Finished server process")
    assert time.monotonic() - started < 20


def _wait_ready(http: httpx.Client) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("the server did not answer /healthz")


def _flood(base: str, flooding: threading.Event) -> None:
    with httpx.Client(base_url=base, timeout=5) as http:
        while flooding.is_set():
            try:
                http.get("/flood")
            except httpx.TransportError:
                return


def _serve() -> None:
    """The server under test: server.logs set up as `funnelgate serve` does, uvicorn on a
    loopback port chosen by the kernel and printed on stdout."""
    import uvicorn

    from server import logs

    padding = "p" * 150
    logged = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal logged
        assert scope["type"] == "http"
        body = b"{}"
        if scope["path"] == "/flood":
            for n in range(LINES_PER_FLOOD):
                logs.log("flood", n=n, padding=padding)
            logged += LINES_PER_FLOOD
        elif scope["path"] == "/done":  # once the writer has caught up
            await asyncio.to_thread(logs.flush)
            body = json.dumps({"flood_lines": logged}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    logs.configure()
    signal.signal(signal.SIGTERM, logs.flush_then_reraise)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_config=None)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    _serve()
