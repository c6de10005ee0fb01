"""Structured logs: one JSON object per line on stderr.

Callers pass only fields that are safe to keep (ids, codes, timings); nothing here ever sees a
request body, a customer value, an access token or a JWT.

funnelgate's own lines skip the stdlib logging machinery (a record, a lock, a write and a flush
per line cost ~30 µs, a tenth of a Run Tool call): inside the event loop they are gathered and
written together once per loop turn, so a busy server makes one write for many lines. Lines
logged outside a loop are written at once. uvicorn's own lines go through stdlib logging in
the same format.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from typing import IO, Any

import orjson

LogValue = str | int | float | bool | None

_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}


class JsonLineFormatter(logging.Formatter):
    """uvicorn's lines, in funnelgate's shape."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__  # the type only: text may hold data
        return orjson.dumps(line).decode()


class _Sink:
    def __init__(self) -> None:
        self.stream: IO[str] | None = None  # until configure(): tests and libraries log nothing
        self.level = logging.INFO
        self.pending: list[bytes] = []
        self.flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush waits in

    def add(self, line: bytes) -> None:
        self.pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: write now
            self.flush()
            return
        if self.flush_on is not loop:
            self.flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_on = None
        if not self.pending:
            return
        data, self.pending = b"".join(self.pending), []
        if self.stream is None:
            return
        buffer = getattr(self.stream, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            self.stream.write(data.decode())
            self.stream.flush()


_sink = _Sink()


def configure(stream: IO[str] | None = None, level: int = logging.INFO) -> None:
    _sink.flush()
    _sink.stream, _sink.level = stream or sys.stderr, level
    handler = logging.StreamHandler(_sink.stream)
    handler.setFormatter(JsonLineFormatter())
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.handlers[:] = [handler]
    uvicorn_logger.setLevel(level)
    uvicorn_logger.propagate = False


def log(event: str, level: int = logging.INFO, **fields: LogValue) -> None:
    if _sink.stream is None or level < _sink.level:
        return
    line: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "level": _LEVEL_NAMES.get(level) or logging.getLevelName(level).lower(),
        "event": event,
    }
    line.update(fields)
    _sink.add(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))


@atexit.register
def _flush_at_exit() -> None:
    _sink.flush()


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
