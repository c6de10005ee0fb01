"""The probes: `GET /healthz` (liveness: the process answers; routes.py) and `GET /readyz`
(readiness: what a call needs is up).

Ready means storage answers (a real read through the outbox's read connection, and a writer
thread whose last transaction committed: Outbox.answers) and the dispatcher's loop runs. Not
ready is 503 `NOT_READY` naming what is down, with `Retry-After`, so an orchestrator stops
sending calls to this instance without restarting it (Kubernetes' readiness probe:
https://kubernetes.io/docs/tasks/configure-pod-container/configure-liveness-readiness-startup-probes/).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from server.delivery.dispatcher import Dispatcher
from server.errors import NotReady
from server.responses import json_response
from server.storage.outbox import Outbox

# After a failed transaction, how long the probe's empty write may take: inside the 1 s that
# Kubernetes gives a probe by default, so a stuck disk answers 503, not a probe timeout.
WRITE_CHECK_SECONDS = 0.8


async def readyz(request: Request) -> Response:
    queue: Outbox = request.app.state.outbox
    dispatcher: Dispatcher = request.app.state.dispatcher
    down = []
    if not await queue.answers(timeout=WRITE_CHECK_SECONDS):
        down.append("storage")
    if not dispatcher.running:
        down.append("dispatcher")
    if down:
        raise NotReady(down)
    return json_response({"status": "ready"})
