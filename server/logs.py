"""Structured logs: one JSON object per line on stderr.

Callers pass only fields that are safe to keep (ids, codes, timings); nothing here ever sees a
request body, a customer value, an access token or a JWT.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson

logger = logging.getLogger("funnelgate")

LogValue = str | int | float | bool | None


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__  # the type only: text may hold data
        return orjson.dumps(line).decode()


def configure(stream: IO[str] | None = None, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    for name in ("funnelgate", "uvicorn.error"):  # uvicorn's start-up lines in the same format
        target = logging.getLogger(name)
        target.handlers[:] = [handler]
        target.setLevel(level)
        target.propagate = False


def log(event: str, level: int = logging.INFO, **fields: LogValue) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
