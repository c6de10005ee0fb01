"""Where events change state, for what counts them: the Prometheus metrics and the console's
per-minute counters. The runner, the dispatcher and the Graph client call one `Observers`;
each listener keeps its own numbers, in memory, so no call waits on a count.

Outcomes, per event: `accepted` (a call's events passed every check: sync or queued),
`queued` (written to the outbox), `delivered` (Meta took it), `failed` (for good: Meta refused
it, or it expired, or its credential went), `retried` (an attempt failed transiently and the
event waits for the next one). Graph requests are heard one by one with their verdict and
latency.
"""

from __future__ import annotations

from collections.abc import Sequence

from tools.base import EventBatch


class Listener:
    """What a listener may hear; each method does nothing unless overridden. Listeners run on
    the event loop, inside the call or the send: they only count."""

    def accepted(self, project_id: str, batch: EventBatch) -> None:
        pass

    def queued(self, project_id: str, pixel_id: str, count: int) -> None:
        pass

    def delivered(self, project_id: str, pixel_id: str, names: Sequence[str]) -> None:
        pass

    def failed(self, project_id: str, pixel_id: str, names: Sequence[str], code: str) -> None:
        pass

    def retried(self, project_id: str, pixel_id: str, count: int) -> None:
        pass

    def graph_request(self, verdict: str, seconds: float) -> None:
        pass


class Observers(Listener):
    """Tells every listener, in order."""

    def __init__(self, listeners: Sequence[Listener] = ()) -> None:
        self.listeners = list(listeners)

    def accepted(self, project_id: str, batch: EventBatch) -> None:
        for listener in self.listeners:
            listener.accepted(project_id, batch)

    def queued(self, project_id: str, pixel_id: str, count: int) -> None:
        for listener in self.listeners:
            listener.queued(project_id, pixel_id, count)

    def delivered(self, project_id: str, pixel_id: str, names: Sequence[str]) -> None:
        for listener in self.listeners:
            listener.delivered(project_id, pixel_id, names)

    def failed(self, project_id: str, pixel_id: str, names: Sequence[str], code: str) -> None:
        for listener in self.listeners:
            listener.failed(project_id, pixel_id, names, code)

    def retried(self, project_id: str, pixel_id: str, count: int) -> None:
        for listener in self.listeners:
            listener.retried(project_id, pixel_id, count)

    def graph_request(self, verdict: str, seconds: float) -> None:
        for listener in self.listeners:
            listener.graph_request(verdict, seconds)
