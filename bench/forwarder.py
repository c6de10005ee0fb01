"""The bare forwarder baseline: what the server stack itself allows for a sync tool call.

A minimal starlette app that parses the Run Tool JSON and POSTs one event to the (fake) Graph
with aiohttp's ClientSession directly, served by uvicorn exactly as `funnelgate serve` is
(uvloop + httptools, no access log, no server header). No auth, no validation, no hashing.

    python bench/forwarder.py --port 8124 --graph-url http://127.0.0.1:8123
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def create_app(graph_url: str) -> Starlette:
    session: dict[str, aiohttp.ClientSession] = {}
    headers = {"content-type": "application/json"}

    async def run_tool(request: Request) -> Response:
        parameters = orjson.loads(await request.body())["parameters"]
        body = orjson.dumps({"data": [parameters], "access_token": "bench-token"})
        url = f"{graph_url}/v24.0/{parameters['pixel']}/events"
        async with session["graph"].post(url, data=body, headers=headers) as answer:
            content = await answer.read()
            return Response(content, answer.status, media_type="application/json")

    async def healthz(_: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=100)
        timeout = aiohttp.ClientTimeout(total=1.5)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
            session["graph"] = client
            yield

    return Starlette(
        routes=[
            Route("/projects/{project_id}/tools", run_tool, methods=["POST"]),
            Route("/healthz", healthz),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--graph-url", required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.graph_url.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        access_log=False,
        log_config=None,
        server_header=False,
    )


if __name__ == "__main__":
    main()
