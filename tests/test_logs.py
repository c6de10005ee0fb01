"""The JSON-lines log: shape, levels, caps, the request id, and a writer that never holds up the
caller: lines are queued, written off the event loop, dropped and counted when the buffer is full,
and never lost while the stream keeps up (not at exit either)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server import logs

ROOT = Path(__file__).resolve().parent.parent


class GatedStream(io.StringIO):
    """A stream nobody reads until the test opens the gate (or 3 s pass, to stay bounded)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.until = time.monotonic() + 3

    def write(self, text: str) -> int:
        self.gate.wait(max(0.0, self.until - time.monotonic()))
        return super().write(text)


@pytest.fixture(autouse=True)
def quiet_afterwards() -> Iterator[None]:
    """Each test configures its own stream; afterwards the log is silent again, as for every
    other test module, and the stdlib loggers have their handlers back."""
    saved = {name: list(logging.getLogger(name).handlers) for name in ("", "uvicorn.error")}
    yield
    if isinstance(logs._sink.stream, GatedStream):
        logs._sink.stream.gate.set()
    logs._sink.flush(5)
    logs._sink.stream, logs._sink.level, logs._sink.max_bytes = None, logs.INFO, logs.BUFFER_BYTES
    for name, handlers in saved.items():
        logging.getLogger(name).handlers[:] = handlers


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    logs.configure(out)
    return out


@pytest.fixture
def gated() -> GatedStream:
    return GatedStream()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    assert logs._sink.flush(5), "the writer did not catch up"
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_holds_ts_level_event_and_the_fields(stream):
    logs.log("request", status=200, project="p1", code=None, duration_ms=1.5)
    [line] = lines(stream)
    assert isinstance(line.pop("ts"), float)
    assert line == {"level": "info", "event": "request", "status": 200, "project": "p1",
                    "code": None, "duration_ms": 1.5}  # fmt: skip


def test_below_the_level_nothing_is_written():
    out = io.StringIO()
    logs.configure(out, level=logging.WARNING)
    logs.log("request")
    logs.log("unhandled_error", logging.ERROR, error="KeyError")
    assert [(line["event"], line["level"]) for line in lines(out)] == [("unhandled_error", "error")]


def test_levels_are_named_by_severity(stream):
    for level in (logs.DEBUG, logs.INFO, logs.WARNING, logs.ERROR, logs.CRITICAL):
        logs.log("x", level)
    # debug is below the default level
    assert [line["level"] for line in lines(stream)] == ["info", "warning", "error", "critical"]


@pytest.mark.parametrize(
    ("status", "level"),
    [(200, "info"), (204, "info"), (307, "info"), (400, "info"), (401, "info"), (404, "info"),
     (413, "info"), (499, "info"), (500, "error"), (502, "error"), (503, "error"), (504, "error")],
)  # fmt: skip
def test_the_request_line_level_follows_the_status(stream, status, level):
    logs.log("request", logs.level_for_status(status), status=status)
    assert lines(stream)[0]["level"] == level


def test_clip_cuts_long_text_and_says_how_much():
    assert logs.clip("FACEBOOK_ADS_SEND_FUNNEL_EVENT") == "FACEBOOK_ADS_SEND_FUNNEL_EVENT"
    assert logs.clip("x" * 256) == "x" * 256
    assert logs.clip("x" * 257) == "x" * 256 + "…(+1 chars)"
    assert logs.clip("é" * 300, limit=200) == "é" * 200 + "…(+100 chars)"


def test_a_caller_string_never_makes_a_long_line(stream):
    logs.log("request", tool="x" * 900_000, project="p1", status=400)
    [line] = lines(stream)
    assert len(stream.getvalue()) < 600
    assert line["tool"] == "x" * logs.FIELD_MAX_CHARS + "…(+899744 chars)"
    assert (line["project"], line["status"]) == ("p1", 400)


def test_untyped_values_never_break_a_line(stream):
    untyped: Any = {
        "exp": 10**400,  # orjson refuses ints beyond 64 bits
        "name": "\ud800",  # a lone surrogate: not valid UTF-8
        "code": {"nested": ["x" * 10_000]},
        "thing": object(),
    }
    logs.log("graph_attempt", status=200, **untyped)
    [line] = lines(stream)
    assert line["status"] == 200
    assert line["exp"] == "<int of 1329 bits>"
    assert line["name"] == "\\ud800"
    assert line["code"].startswith("{'nested': ['xxx") and line["code"].endswith("chars)")
    assert line["thing"].startswith("<object object at")
    assert len(stream.getvalue()) < 1000


def test_every_line_carries_the_request_id_while_it_is_set(stream):
    logs.log("before")
    token = logs.set_request_id("req-1")
    logs.log("during")
    logging.getLogger("uvicorn.error").warning("from uvicorn")
    logs.reset_request_id(token)
    logs.log("after")
    assert [(line["event"], line.get("request_id")) for line in lines(stream)] == [
        ("before", None), ("during", "req-1"), ("from uvicorn", "req-1"), ("after", None),
    ]  # fmt: skip


def test_concurrent_requests_keep_their_own_request_id(stream):
    async def handle(request_id: str) -> None:
        token = logs.set_request_id(request_id)
        try:
            for n in range(3):
                logs.log("step", who=request_id, n=n)
                await asyncio.sleep(0)
        finally:
            logs.reset_request_id(token)

    async def serve() -> None:
        await asyncio.gather(*(handle(f"r{k}") for k in range(4)))

    asyncio.run(serve())
    seen = lines(stream)
    assert len(seen) == 12
    assert all(line["request_id"] == line["who"] for line in seen)


def test_a_request_id_header_is_kept_when_plain_and_short():
    for value in [b"abc-123", b"0f8fad5b-d9cb-469f-a165-70867728950e", b"a.b:c_d+e/f=", b"x" * 128]:
        assert logs.request_id_from_header(value) == value.decode()


def test_any_other_request_id_header_is_replaced():
    made = []
    for value in [None, b"", b"x" * 129, b"has space", b"joe@example.com", b"a\nb", b"\xff"]:
        request_id = logs.request_id_from_header(value)
        assert re.fullmatch(r"[0-9a-f]{32}", request_id), value
        made.append(request_id)
    assert len(set(made)) == len(made)


def test_lines_from_a_running_loop_arrive_complete_and_in_order(stream):
    logged: list[tuple[int, int]] = []

    async def task(k: int) -> None:
        for n in range(2000):
            logs.log("graph_attempt", task=k, n=n)
            logged.append((k, n))
            if n % 7 == k:
                await asyncio.sleep(0)

    async def serve() -> None:
        await asyncio.gather(*(task(k) for k in range(5)))

    asyncio.run(serve())
    assert [(line["task"], line["n"]) for line in lines(stream)] == logged


def test_a_stalled_stream_never_holds_up_the_loop(gated):
    logs.configure(gated, buffer_bytes=64 * 1024)

    async def burst() -> float:
        started = time.perf_counter()
        for n in range(5000):
            logs.log("graph_attempt", n=n)
            if n % 10 == 0:
                await asyncio.sleep(0)
        return time.perf_counter() - started

    took = asyncio.run(burst())
    assert took < 1.0  # the stream stays shut for 3 s


def test_lines_past_a_full_buffer_are_dropped_then_counted(gated):
    logs.configure(gated, buffer_bytes=16 * 1024)
    for n in range(2000):
        logs.log("graph_attempt", n=n)
    gated.gate.set()
    assert logs._sink.flush(5)  # the writer catches up
    logs.log("after")
    seen = lines(gated)
    attempts = [line["n"] for line in seen if line["event"] == "graph_attempt"]
    assert 0 < len(attempts) < 2000
    assert attempts == list(range(len(attempts)))  # the lines before the buffer filled
    [report] = [line for line in seen if line["event"] == "log_lines_dropped"]
    assert (report["level"], report["count"]) == ("warning", 2000 - len(attempts))
    assert [line["event"] for line in seen[-2:]] == ["log_lines_dropped", "after"]


class SlowStream(io.StringIO):
    """A reader that keeps reading, slowly: each write takes 10 ms."""

    def write(self, text: str) -> int:
        time.sleep(0.01)
        return super().write(text)


def test_each_gap_is_reported_where_it_happened():
    out = SlowStream()
    logs.configure(out, buffer_bytes=2048)
    logged = 0
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        logs.log("graph_attempt", n=logged)
        logged += 1
    seen = lines(out)
    expected = 0  # walking the output: a report accounts for exactly the lines missing there
    for line in seen:
        if line["event"] == "log_lines_dropped":
            assert line["count"] > 0
            expected += line["count"]
        else:
            assert line["n"] == expected
            expected += 1
    assert expected == logged
    assert sum(line["event"] == "log_lines_dropped" for line in seen) > 1


def test_uvicorn_and_library_lines_share_the_buffer_and_the_shape(gated):
    logs.configure(gated)
    started = time.perf_counter()
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    logging.getLogger("mcp.server.lowlevel").warning("x" * 10_000)
    logging.getLogger("mcp.server.lowlevel").info("chatter")  # libraries: warnings and up
    assert time.perf_counter() - started < 1.0  # the stream stays shut for 3 s
    gated.gate.set()
    seen = lines(gated)
    for line in seen:
        del line["ts"]
    assert seen == [
        {"level": "warning", "event": "Invalid HTTP request received.", "logger": "uvicorn.error"},
        {
            "level": "warning",
            "event": "x" * 256 + "…(+9744 chars)",
            "logger": "mcp.server.lowlevel",
        },
    ]


class BrokenPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_failing_stream_costs_its_lines_never_the_caller_or_the_writer():
    logs.configure(BrokenPipe())
    logs.log("lost")  # raises nothing
    assert logs._sink.flush(5)
    out = io.StringIO()
    logs.configure(out)
    logs.log("kept")
    seen = [(line["event"], line.get("count")) for line in lines(out)]
    assert seen == [("log_lines_dropped", 1), ("kept", None)]


def test_configure_sends_queued_lines_to_the_old_stream_first():
    first, second = io.StringIO(), io.StringIO()
    logs.configure(first)
    for n in range(100):
        logs.log("graph_attempt", n=n)
    logs.configure(second)
    logs.log("request")
    assert [line["n"] for line in lines(first)] == list(range(100))
    assert [line["event"] for line in lines(second)] == ["request"]


EXITING_CHILD = """
import asyncio, signal, sys
from server import logs

logs.configure()
signal.signal(signal.SIGTERM, logs.flush_then_reraise)  # as `funnelgate serve` does

async def main() -> None:
    for n in range(10_000):
        logs.log("graph_attempt", n=n)
        if n % 100 == 0:
            await asyncio.sleep(0)
    if sys.argv[1] == "raise":
        raise SystemExit(3)
    if sys.argv[1] == "sigterm":  # what uvicorn does after shutting down on SIGTERM
        signal.raise_signal(signal.SIGTERM)

asyncio.run(main())
"""


@pytest.mark.parametrize(("how", "code"), [("return", 0), ("raise", 3), ("sigterm", -15)])
def test_every_line_reaches_stderr_before_the_process_exits(how, code):
    # ~700 KB: ten times what the pipe holds, so the exit has to wait for the writer.
    child = subprocess.run([sys.executable, "-c", EXITING_CHILD, how], cwd=ROOT,
                           capture_output=True, timeout=30)  # fmt: skip
    assert child.returncode == code, child.stderr[-2000:]
    seen = [json.loads(line) for line in child.stderr.splitlines()]
    assert [line["n"] for line in seen] == list(range(10_000))


def test_a_flush_after_a_long_steady_stream_returns_promptly(tmp_path):
    """Wake-ups queued while lines kept coming must not each cost the next flush a gather."""
    with (tmp_path / "log").open("w") as stream:
        logs.configure(stream)
        try:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:  # a steady stream, as under load
                logs.log("request", status=200)
                time.sleep(0.001)
            started = time.monotonic()
            assert logs.flush(10)
            assert time.monotonic() - started < 1.0  # gross: was ~1 s per second of traffic
        finally:
            logs.flush(5)
            logs._sink.stream = None
