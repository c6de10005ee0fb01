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
from server.delivery.throttle import THROTTLE_CODES, Breakers, Key
from server.delivery.timeouts import AttemptTimeouts
from server.delivery.transport import ConnectionFailed, GraphTransport
from server.errors import UpstreamAuth, UpstreamError, UpstreamRejected, UpstreamUnavailable
from server.logs import log
from server.observe import Observers
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
    return signed_body_of(
        delivery.data, delivery.batch.test_event_code, delivery.access_token, delivery.app_secret
    )


def signed_body_of(
    data: bytes, test_event_code: str | None, access_token: str, app_secret: str | None
) -> dict[str, Any]:
    """The same body from events already serialised (a JSON array), as the outbox holds them."""
    body: dict[str, Any] = {"data": orjson.Fragment(data), "partner_agent": PARTNER_AGENT}
    if test_event_code:
        body["test_event_code"] = test_event_code
    body["access_token"] = access_token
    if app_secret:
        body["appsecret_proof"] = hmac.new(
            app_secret.encode(), access_token.encode(), hashlib.sha256
        ).hexdigest()
    return body


class Sender(Protocol):
    def submit(
        self, delivery: Delivery, *, project_id: str, budget: float
    ) -> asyncio.Future[dict[str, Any]]:
        """Meta's answer for the delivery's events, or an UpstreamError, in a future."""

    def attempt_timeout(self) -> float:
        """How long an attempt started now may wait for Meta."""


@dataclass
class Attempt:
    """One request's outcome, classified."""

    verdict: Verdict
    status: int | None = None
    payload: dict[str, Any] | None = None
    failure: str = ""  # "timeout", "connection" or "bad_response" when Graph's JSON never came
    seconds: float = 0.0

    @property
    def error(self) -> dict[str, Any]:
        error = (self.payload or {}).get("error")
        return error if isinstance(error, dict) else {}

    @property
    def throttled(self) -> bool:
        return self.error.get("code") in THROTTLE_CODES or self.status == 429


class GraphClient:
    def __init__(
        self,
        settings: GraphSettings,
        transport: GraphTransport,
        *,
        breakers: Breakers | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        observers: Observers | None = None,
    ) -> None:
        self._settings = settings
        self.observers = observers or Observers()
        self._transport = transport
        self.breakers = breakers or Breakers()
        self.timeouts = AttemptTimeouts(settings.timeout_seconds)  # the sync calls' clock
        self._sleep = sleep
        self._rand = rand

    async def aclose(self) -> None:
        await self._transport.aclose()

    def url(self, pixel_id: str) -> str:
        s = self._settings
        return f"{s.base_url}/{s.api_version}/{quote(pixel_id, safe='')}/events"

    def attempt_timeout(self) -> float:
        return self.timeouts.current()

    def submit(
        self, delivery: Delivery, *, project_id: str, budget: float
    ) -> asyncio.Future[dict[str, Any]]:
        return asyncio.ensure_future(self.send(delivery, project_id=project_id, budget=budget))

    async def send(self, delivery: Delivery, *, project_id: str, budget: float) -> dict[str, Any]:
        """Meta's success body; raises an UpstreamError once retrying cannot help.

        No attempt starts after `budget` seconds, and none is cut before the budget ends (nor
        before its own timeout): the runner hands an attempt still out at the end over to the
        queue. Every attempt sends the same bytes, so event_ids stay stable for deduplication.
        """
        pixel_id = delivery.batch.pixel_id
        key = (delivery.access_token, pixel_id)
        if not self.breakers.allow(key):
            raise UpstreamUnavailable(
                "Meta is throttling or failing requests for this pixel; the event is queued.",
                {"attempts": 0, "breaker": "open"},
                event_ids=delivery.batch.event_ids,
            )
        url = self.url(pixel_id)
        content = orjson.dumps(signed_body(delivery))
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            attempt += 1
            try:
                # Not cut before the budget ends: Meta may be processing it, and a resend
                # would be a second copy; a slow answer in the budget is still an answer.
                remaining = deadline - time.monotonic()
                result = await self.attempt(url, content, self.timeouts, at_least=remaining)
            except BaseException:
                self.breakers.abandoned(key)
                raise
            log_attempt(result, project_id, pixel_id, len(delivery.batch.events), attempt)
            self.judge(key, result)
            if result.verdict is Verdict.DELIVERED and result.payload is not None:
                return result.payload
            if result.verdict is not Verdict.RETRY:
                raise final_error(result, attempt, delivery.batch.event_ids)
            delay = backoff_seconds(attempt, rand=self._rand)
            out_of_time = time.monotonic() + delay + _MIN_ATTEMPT_SECONDS > deadline
            if out_of_time or not self.breakers.allow(key):
                raise final_error(result, attempt, delivery.batch.event_ids)
            await self._sleep(delay)

    def judge(self, key: Key, result: Attempt) -> None:
        """Feed the shared breaker with an answer."""
        if result.verdict is Verdict.RETRY:
            self.breakers.failed(key, throttled=result.throttled)
        else:
            self.breakers.succeeded(key)

    async def attempt(
        self, url: str, content: bytes, timeouts: AttemptTimeouts, *, at_least: float = 0.0
    ) -> Attempt:
        """One POST, on `timeouts`' current clock (which learns from it), or `at_least`."""
        result = await self._attempt(url, content, timeouts, at_least)
        self.observers.graph_request(result.verdict.value, result.seconds)
        return result

    async def _attempt(
        self, url: str, content: bytes, timeouts: AttemptTimeouts, at_least: float
    ) -> Attempt:
        timeout = max(timeouts.current(), at_least)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                answer = await self._transport.post(url, content)
        except TimeoutError:
            timeouts.timed_out(timeout)
            return Attempt(Verdict.RETRY, failure="timeout", seconds=timeout)
        except ConnectionFailed:
            return Attempt(Verdict.RETRY, failure="connection", seconds=_since(started))
        seconds = _since(started)
        timeouts.answered(seconds)
        try:
            payload = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            # An answer that is not Graph's JSON (a proxy page, a truncated body): transient.
            return Attempt(
                Verdict.RETRY, status=answer.status, failure="bad_response", seconds=seconds
            )
        error = payload.get("error")
        verdict = classify(answer.status, error if isinstance(error, dict) else {})
        return Attempt(verdict, status=answer.status, payload=payload, seconds=seconds)


def _since(started: float) -> float:
    return time.perf_counter() - started


def log_attempt(
    result: Attempt, project_id: str, pixel_id: str, events: int, attempt: int, **more: Any
) -> None:
    error = result.error
    log(
        "graph_attempt",
        project=project_id,
        pixel=pixel_id,
        events=events,
        attempt=attempt,
        status=result.status,
        verdict=result.verdict.value,
        failure=result.failure or None,
        code=error.get("code"),
        subcode=error.get("error_subcode"),
        fbtrace_id=(result.payload or error).get("fbtrace_id"),
        duration_ms=round(result.seconds * 1000, 2),
        **more,
    )


def final_error(result: Attempt, attempts: int, event_ids: list[str]) -> UpstreamError:
    error = result.error
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
