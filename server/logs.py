"""Structured logs: one JSON object per line on stderr, written off the event loop.

Callers pass only fields that are safe to keep (ids, codes, timings); nothing here ever sees a
request body, a customer value, an access token or a JWT. Text a caller sent (a tool name, a
header) goes through `clip()` first, and `log()` caps every string field anyway, so no request
can make a long line.

funnelgate's own lines skip the stdlib logging machinery (a record, a lock, a write and a flush
per line cost ~30 µs, a tenth of a Run Tool call): `log()` serialises the line with orjson and
appends it to a buffer; one writer thread writes the buffer to the stream, so a slow reader of
stderr (a full pipe) stalls that thread, never the event loop. The buffer is bounded
(`BUFFER_BYTES` by default); while it is full new lines are dropped and counted, and the next
line written reports the count (`log_lines_dropped`, level warning). uvicorn's lines and other
libraries' warnings go through the same buffer, in the same shape.

The stream gets everything written before the process exits (atexit, bounded by
`EXIT_FLUSH_SECONDS` so a reader that never reads cannot hang the exit; on SIGTERM once
`flush_then_reraise` is its handler) and before `configure()` switches to a new stream.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from contextvars import ContextVar, Token
from types import FrameType
from typing import IO, Any

import orjson

LogValue = str | int | float | bool | None

DEBUG, INFO, WARNING, ERROR, CRITICAL = (
    logging.DEBUG,
    logging.INFO,
    logging.WARNING,
    logging.ERROR,
    logging.CRITICAL,
)
_SCALARS = frozenset({int, float, bool, type(None)})
_LEVEL_NAMES = {
    DEBUG: "debug",
    INFO: "info",
    WARNING: "warning",
    ERROR: "error",
    CRITICAL: "critical",
}

# A string field longer than this is cut and marked: `abc…(+N chars)`. Ids, codes and names fit.
FIELD_MAX_CHARS = 256
# Bytes of lines waiting for the writer: ~3,800 lines of ~275 bytes, over half a second of logs
# at the throughput BENCHMARKS.md measures (~3,300 calls/s, two lines each), enough to ride out a
# stall of the reader; memory stays bounded whatever the reader does.
BUFFER_BYTES = 1024 * 1024
EXIT_FLUSH_SECONDS = 5.0
# Before each write the writer waits this long, so one write carries many lines: every write
# costs the event loop a hand-over of the GIL. Logging cost 53 µs of CPU per call at 8
# connections writing as soon as lines came, 11 µs every 20 ms, ~5 µs every 50 or 100 ms
# (bench/hotpath.py); lines reach the stream within 50 ms, well inside the buffer.
GATHER_SECONDS = 0.05
# The longest `log_lines_dropped` line, reserved with the line that carries it.
_DROPPED_LINE_MAX_BYTES = 96

# X-Request-ID: a caller's id is kept when it is short and plain (nginx's $request_id, a UUID, a
# ULID, base64); anything else is replaced by a generated one rather than refused or echoed.
REQUEST_ID_MAX_CHARS = 128
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=-]+")

request_id_var: ContextVar[str | None] = ContextVar("funnelgate_request_id", default=None)


def set_request_id(request_id: str | None) -> Token[str | None]:
    """Every line logged in this context (the request's task) carries `request_id` from now."""
    return request_id_var.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    request_id_var.reset(token)


def request_id_from_header(value: bytes | None) -> str:
    """The caller's X-Request-ID when it is plain text of at most 128 chars, else a new id."""
    if value and len(value) <= REQUEST_ID_MAX_CHARS and _REQUEST_ID.fullmatch(value):
        return value.decode("ascii")
    return os.urandom(16).hex()


def level_for_status(status: int) -> int:
    """The request line's level: error for 5xx (funnelgate or Graph failed: the operator acts),
    info for the rest. 4xx stays info: it is the caller's mistake, and any client can produce it
    at will, so at warning level it would drown the operator's real warnings."""
    return ERROR if status >= 500 else INFO


def clip(value: str, limit: int = FIELD_MAX_CHARS) -> str:
    """`value` cut to `limit` characters, marked with how many were cut."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…(+{len(value) - limit} chars)"


class JsonLineFormatter(logging.Formatter):
    """uvicorn's (and other libraries') lines, in funnelgate's shape."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": clip(record.getMessage()),
            "logger": record.name,
        }
        request_id = request_id_var.get()
        if request_id is not None:
            line["request_id"] = request_id
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__  # the type only: text may hold data
        return _dumps(line).decode()


class _SinkHandler(logging.Handler):
    """Hands stdlib records to the buffer: a library's line never writes on the event loop."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _sink.add(self.format(record).encode() + b"\n")
        except Exception:  # stdlib convention: a handler never raises
            self.handleError(record)


def _dropped_line(count: int) -> bytes:
    line = {"ts": round(time.time(), 3), "level": "warning", "event": "log_lines_dropped"}
    return orjson.dumps({**line, "count": count}, option=orjson.OPT_APPEND_NEWLINE)


class _Sink:
    """A bounded buffer of lines and the one thread that writes it to the stream."""

    def __init__(self) -> None:
        self.stream: IO[str] | None = None  # until configure(): tests and libraries log nothing
        self.level = INFO
        self.max_bytes = BUFFER_BYTES
        self.lock = threading.Lock()  # guards the five fields below
        self.pending: list[bytes] = []
        self.queued_bytes = 0  # pending or being written
        self.dropped = 0  # since the last line that reported drops
        self.dropped_total = 0  # since the process started (the metrics)
        self.wakeups: queue.SimpleQueue[threading.Event | None] = queue.SimpleQueue()
        self.writer: threading.Thread | None = None

    def add(self, line: bytes) -> None:
        """Queue `line` for the writer, or count it dropped when the buffer is full."""
        with self.lock:
            size = len(line) + (_DROPPED_LINE_MAX_BYTES if self.dropped else 0)
            if self.queued_bytes + size > self.max_bytes:
                self.dropped += 1
                self.dropped_total += 1
                return
            if self.dropped:  # the first line after a gap says how long the gap was
                line = _dropped_line(self.dropped) + line
                self.dropped = 0
            self.pending.append(line)
            self.queued_bytes += len(line)
            wake = len(self.pending) == 1
        if wake:
            self.wakeups.put(None)

    def start(self) -> None:
        if self.writer is None or not self.writer.is_alive():
            self.writer = threading.Thread(target=self._run, name="funnelgate-logs", daemon=True)
            self.writer.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every line queued so far is written; False if `timeout` ran out first."""
        if self.writer is None or not self.writer.is_alive():
            self._write_pending()
            return True
        done = threading.Event()
        self.wakeups.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            requests = [self.wakeups.get()]
            # Gather before every write, also while lines keep coming: writing again at once
            # would turn a steady stream of lines into a steady fight for the GIL.
            time.sleep(GATHER_SECONDS)
            while self._write_pending():
                time.sleep(GATHER_SECONDS)
            # Wake-ups queued meanwhile: their lines went out with these writes or go with the
            # last one (add() queues a line before its wake-up, flush() after its lines).
            while not self.wakeups.empty():
                requests.append(self.wakeups.get())
            self._write_pending()
            for request in requests:
                if request is not None:
                    request.set()

    def _write_pending(self) -> bool:
        with self.lock:
            batch, self.pending = self.pending, []
            dropped, self.dropped = self.dropped, 0
        if not batch and not dropped:
            return False
        size = sum(map(len, batch))
        if dropped:  # every line in the batch came before these drops (add() reports earlier)
            batch.append(_dropped_line(dropped))
        try:
            self._write(b"".join(batch))
        except Exception:  # a broken, closed or wrong stream: count what it lost, keep going
            lost = len(batch) - (1 if dropped else 0)
            with self.lock:
                self.dropped += dropped + lost
                self.dropped_total += lost
            return False  # no retry until more lines come
        finally:
            with self.lock:
                self.queued_bytes -= size
        return True

    def _write(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            return
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.StringIO and the like
            stream.write(data.decode())
            stream.flush()
            return
        # Straight to the descriptor, not through the stream's buffer: a write stalled on a full
        # pipe then holds no lock that the main thread needs to flush stderr at exit.
        stream.flush()  # anything printed to the stream before goes first
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


_sink = _Sink()


def configure(
    stream: IO[str] | None = None, level: int = INFO, *, buffer_bytes: int = BUFFER_BYTES
) -> None:
    """Log to `stream` (stderr by default) from now on; lines already queued go to the old one.

    uvicorn's lines and other libraries' warnings go the same way, through the same buffer.
    """
    _sink.flush(EXIT_FLUSH_SECONDS)
    _sink.stream, _sink.level, _sink.max_bytes = stream or sys.stderr, level, buffer_bytes
    _sink.start()
    handler = _SinkHandler()
    handler.setFormatter(JsonLineFormatter())
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.handlers[:] = [handler]
    uvicorn_logger.setLevel(level)
    uvicorn_logger.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [handler]  # libraries' warnings: the same shape, never a blocking write
    root.setLevel(max(level, WARNING))


def log(event: str, level: int = INFO, **fields: LogValue) -> None:
    """One line: `ts`, `level`, `event`, `request_id` while one is set, then `fields`.

    Strings longer than FIELD_MAX_CHARS are clipped; values that are not JSON scalars become
    clipped text, so a field can never make a line long or make logging fail.
    """
    if _sink.stream is None or level < _sink.level:
        return
    for key, value in fields.items():
        if type(value) is str:
            if len(value) > FIELD_MAX_CHARS:
                fields[key] = clip(value)
        elif type(value) not in _SCALARS:
            fields[key] = _as_text(value)  # from an untyped (Any) source
    line: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "level": _LEVEL_NAMES.get(level) or logging.getLevelName(level).lower(),
        "event": clip(event),
    }
    request_id = request_id_var.get()
    if request_id is not None:
        line["request_id"] = request_id
    line.update(fields)
    _sink.add(_dumps(line, orjson.OPT_APPEND_NEWLINE))


def _dumps(line: dict[str, Any], option: int = 0) -> bytes:
    try:
        return orjson.dumps(line, option=option)
    except orjson.JSONEncodeError:  # a lone surrogate in a string, or an int beyond 64 bits
        return orjson.dumps({key: _repaired(value) for key, value in line.items()}, option=option)


def _repaired(value: Any) -> Any:
    if type(value) is str:
        return value.encode("utf-8", "backslashreplace").decode()
    if type(value) is int and value.bit_length() > 63:
        return f"<int of {value.bit_length()} bits>"
    return value


def _as_text(value: object) -> LogValue:
    if isinstance(value, int | float):  # subclasses (IntEnum...): orjson writes them as numbers
        return value
    if isinstance(value, str):
        return clip(value)
    try:  # a container or an object: its text, clipped
        return clip(repr(value))
    except ValueError:  # a huge int inside
        return f"<{type(value).__name__}>"


def dropped_lines() -> int:
    """Lines dropped since the process started: a full buffer, or a stream that failed."""
    return _sink.dropped_total


def flush(timeout: float | None = EXIT_FLUSH_SECONDS) -> bool:
    """Wait until every line logged so far is written; False if `timeout` ran out first."""
    return _sink.flush(timeout)


def flush_then_reraise(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler for `serve`: write what is queued, then die of the signal as before.

    uvicorn shuts down on SIGTERM and then re-raises it with the handler it found; with the
    default handler the process ends there and atexit never runs, losing the last lines.
    """
    flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


atexit.register(flush)


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
