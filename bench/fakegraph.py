"""A fast fake Graph API for benchmarks, run as its own process.

Answers every POST with 200 and `{"events_received": N, ...}`, and `GET` with
`{"received": POSTs so far, "events": events in them}` (events counted by their `event_name`
key, which funnelgate's bodies hold once per event). Raw asyncio protocol + httptools parser
on uvloop, so it serves several times what funnelgate can send (e2e.py measures this in every
run).

    python bench/fakegraph.py --port 8123
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import cast

import httptools
import uvloop

BODY = b'{"events_received":%d,"messages":[],"fbtrace_id":"bench-fake-graph"}'


def _response(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


class GraphProtocol(asyncio.Protocol):
    received = 0
    events = 0

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self.parser.get_method() == b"POST":
            count = b"".join(self.body).count(b'"event_name"')
            self.body.clear()
            GraphProtocol.received += 1
            GraphProtocol.events += count
            self.transport.write(_response(BODY % count))
        else:
            stats = {"received": self.received, "events": self.events}
            self.transport.write(_response(json.dumps(stats).encode()))
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(GraphProtocol, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
