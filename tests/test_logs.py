"""The JSON-lines log: shape, levels, and lines gathered per event-loop turn never lost."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from server import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure(out)
    yield out
    logs._sink.stream = None  # back to silent, as for every other test


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_outside_a_loop_a_line_is_written_at_once(stream):
    logs.log("request", status=200, project="p1")
    [line] = lines(stream)
    assert line["event"] == "request" and line["level"] == "info"
    assert (line["status"], line["project"]) == (200, "p1")
    assert isinstance(line["ts"], float)


def test_below_the_level_nothing_is_written():
    out = io.StringIO()
    logs.configure(out, level=logging.WARNING)
    try:
        logs.log("request")
        logs.log("unhandled_error", logging.ERROR, error="KeyError")
    finally:
        logs._sink.stream = None
    assert [line["event"] for line in lines(out)] == ["unhandled_error"]
    assert lines(out)[0]["level"] == "error"


def test_inside_a_loop_lines_wait_for_the_turn_then_go_out_together(stream):
    async def go() -> list[int]:
        seen = []
        for n in range(3):
            logs.log("graph_attempt", attempt=n)
            seen.append(len(stream.getvalue().splitlines()))
        await asyncio.sleep(0)  # one loop turn
        seen.append(len(stream.getvalue().splitlines()))
        return seen

    assert asyncio.run(go()) == [0, 0, 0, 3]
    assert [line["attempt"] for line in lines(stream)] == [0, 1, 2]


def test_a_loop_that_closes_before_its_turn_loses_nothing(stream):
    async def log_and_leave() -> None:
        logs.log("request", n=1)

    asyncio.run(log_and_leave())  # asyncio.run still turns the loop once while closing
    asyncio.new_event_loop().close()

    async def next_loop() -> None:
        logs.log("request", n=2)
        await asyncio.sleep(0)

    asyncio.run(next_loop())
    assert [line["n"] for line in lines(stream)] == [1, 2]


def test_exit_flushes_what_is_pending(stream):
    async def log_then_exit() -> None:
        logs.log("request", n=1)
        assert stream.getvalue() == ""  # waiting for the loop's turn
        logs._flush_at_exit()  # the interpreter exits first
        assert [line["n"] for line in lines(stream)] == [1]

    asyncio.run(log_then_exit())
    assert len(lines(stream)) == 1  # and the scheduled flush writes nothing twice
