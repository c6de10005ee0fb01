"""The Graph API client: POST /{version}/{pixel}/events with retries by error class.

The transport is chosen by the composition root (server/app.py: aiohttp in production; the
sandbox and tests plug in through httpx). The access token travels in the JSON body, never in
the URL, so it cannot reach access logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from server.config import GraphSettings
from server.delivery.policy import Verdict, backoff_seconds, classify
from server.delivery.transport import ConnectionFailed, GraphTransport
from server.errors import UpstreamAuth, UpstreamError, UpstreamRejected, UpstreamUnavailable
from server.logs import elapsed_ms, log
from tools.base import EventBatch

PARTNER_AGENT = "funnelgate"
# Meta takes at most 1,000 events per /events request.
MAX_EVENTS_PER_REQUEST = 1000
# Do not start an attempt with less time than this left before the deadline.
_MIN_ATTEMPT_SECONDS = 0.1
_UPSTREAM_KEYS = (
    "message", "type", "code", "error_subcode", "error_user_title", "error_user_msg",
    "fbtrace_id", "is_transient",
)  # fmt: skip


@dataclass(frozen=True)
class Delivery:
    """One request to the /events edge: the events and the credentials to send them with.

    The events are serialised when the delivery is made, in its own caller's call: a value
    that cannot become JSON fails that call alone (orjson.JSONEncodeError), never a request
    it would later share with others (coalesce.py).
    """

    batch: EventBatch
    access_token: str = field(repr=False)
    app_secret: str | None = field(default=None, repr=False)
    data: bytes = field(default=b"", repr=False)  # the events as a JSON array

    def __post_init__(self) -> None:
        if not self.data:
            object.__setattr__(self, "data", orjson.dumps(self.batch.events))

    @classmethod
    def combined(cls, deliveries: list[Delivery]) -> Delivery:
        """One delivery of several deliveries' events (same pixel and credentials), reusing
        the bytes each one already made."""
        first = deliveries[0]
        batch = EventBatch(
            pixel_id=first.batch.pixel_id,
            events=[event for d in deliveries for event in d.batch.events],
            test_event_code=first.batch.test_event_code,
        )
        data = b"[" + b",".join(d.data[1:-1] for d in deliveries if d.batch.events) + b"]"
        return cls(batch, first.access_token, first.app_secret, data)


def request_body(batch: EventBatch) -> dict[str, Any]:
    """The JSON body Graph receives, less credentials: what a dry run shows."""
    body: dict[str, Any] = {"data": batch.events, "partner_agent": PARTNER_AGENT}
    if batch.test_event_code:
        body["test_event_code"] = batch.test_event_code
    return body


def signed_body(delivery: Delivery) -> dict[str, Any]:
    """The JSON body Graph receives, token and appsecret_proof included."""
    body = request_body(delivery.batch)
    body["data"] = orjson.Fragment(delivery.data)
    body["access_token"] = delivery.access_token
    if delivery.app_secret:
        body["appsecret_proof"] = hmac.new(
            delivery.app_secret.encode(), delivery.access_token.encode(), hashlib.sha256
        ).hexdigest()
    return body


class Sender(Protocol):
    async def send(self, delivery: Delivery, *, project_id: str) -> dict[str, Any]: ...


@dataclass
class _Attempt:
    verdict: Verdict
    status: int | None = None
    payload: dict[str, Any] | None = None
    failure: str = ""  # "timeout" or "connection" when no answer came back


class GraphClient:
    def __init__(
        self,
        settings: GraphSettings,
        transport: GraphTransport,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._sleep = sleep
        self._rand = rand

    async def aclose(self) -> None:
        await self._transport.aclose()

    def url(self, pixel_id: str) -> str:
        s = self._settings
        return f"{s.base_url}/{s.api_version}/{quote(pixel_id, safe='')}/events"

    async def send(self, delivery: Delivery, *, project_id: str) -> dict[str, Any]:
        """Meta's success body; raises an UpstreamError once retrying cannot help.

        Every attempt sends the same bytes, so event_ids stay stable for deduplication.
        """
        url = self.url(delivery.batch.pixel_id)
        content = orjson.dumps(signed_body(delivery))
        deadline = time.monotonic() + self._settings.retry_deadline_seconds
        attempt = 0
        while True:
            attempt += 1
            budget = min(self._settings.timeout_seconds, deadline - time.monotonic())
            started = time.perf_counter()
            result = await self._attempt(url, content, budget)
            error = (result.payload or {}).get("error") or {}
            log(
                "graph_attempt",
                project=project_id,
                pixel=delivery.batch.pixel_id,
                events=len(delivery.batch.events),
                attempt=attempt,
                status=result.status,
                verdict=result.verdict.value,
                failure=result.failure or None,
                code=error.get("code"),
                subcode=error.get("error_subcode"),
                fbtrace_id=(result.payload or error).get("fbtrace_id"),
                duration_ms=elapsed_ms(started),
            )
            if result.verdict is Verdict.DELIVERED and result.payload is not None:
                return result.payload
            if result.verdict is not Verdict.RETRY:
                raise _final_error(result, attempt, delivery.batch.event_ids)
            delay = backoff_seconds(attempt, rand=self._rand)
            if time.monotonic() + delay + _MIN_ATTEMPT_SECONDS > deadline:
                raise _final_error(result, attempt, delivery.batch.event_ids)
            await self._sleep(delay)

    async def _attempt(self, url: str, content: bytes, budget: float) -> _Attempt:
        try:
            async with asyncio.timeout(budget):
                answer = await self._transport.post(url, content)
        except TimeoutError:
            return _Attempt(Verdict.RETRY, failure="timeout")
        except ConnectionFailed:
            return _Attempt(Verdict.RETRY, failure="connection")
        try:
            payload = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            # An answer that is not Graph's JSON (a proxy page, a truncated body): transient.
            return _Attempt(Verdict.RETRY, status=answer.status, failure="bad_response")
        error = payload.get("error")
        verdict = classify(answer.status, error if isinstance(error, dict) else {})
        return _Attempt(verdict, status=answer.status, payload=payload)


def _final_error(result: _Attempt, attempts: int, event_ids: list[str]) -> UpstreamError:
    error = (result.payload or {}).get("error") or {}
    upstream: dict[str, Any] = {k: error[k] for k in _UPSTREAM_KEYS if k in error}
    upstream["http_status"] = result.status
    upstream["attempts"] = attempts
    meta_says = error.get("error_user_msg") or error.get("message") or ""
    if result.verdict is Verdict.REJECTED:
        return UpstreamRejected(
            f"Meta rejected the event: {meta_says}".rstrip(": "), upstream, event_ids=event_ids
        )
    if result.verdict is Verdict.AUTH:
        return UpstreamAuth(
            f"Meta refused the access token or its permissions: {meta_says}".rstrip(": "),
            upstream,
            event_ids=event_ids,
        )
    what = {"timeout": "timed out", "connection": "could not connect"}.get(
        result.failure, f"answered HTTP {result.status}"
    )
    return UpstreamUnavailable(
        f"Meta's Graph API is unavailable ({what}; gave up after {attempts} attempt"
        f"{'s' if attempts > 1 else ''}). Safe to retry with the same event_id.",
        upstream,
        event_ids=event_ids,
        status=504 if result.failure == "timeout" else 502,
    )
