"""The sandbox Graph: Meta's /events edge, offline, for the dev setup and for tests.

It applies Meta's documented rejection rules to the wire JSON, written here independently of
the tools' own pre-checks (so a mapping bug shows up as a rejection), and records what it
accepted with the access token redacted: `GET /sandbox/events` shows what Meta would have got.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MUST_BE_HASHED = ("em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country")
_ACTION_SOURCES = frozenset(
    {"email", "website", "app", "phone_call", "chat", "physical_store", "system_generated",
     "business_messaging", "other"}
)  # fmt: skip
_BASELINE_INSUFFICIENT = (
    {"ct", "country", "st", "zp", "ge", "client_user_agent"},
    {"db", "client_user_agent"},
    {"fn", "ge"},
    {"ln", "ge"},
)
SUBCODE_INSUFFICIENT_CUSTOMER_INFO = 2804050  # documented by Meta


class _Rejected(Exception):
    def __init__(self, message: str, code: int = 100, subcode: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.subcode = subcode


def _random_trace_id() -> str:
    return "sandbox-" + secrets.token_hex(6)


class SandboxGraph:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        keep: int = 1000,
        *,
        trace_id: Callable[[], str] = _random_trace_id,
    ) -> None:
        self._clock = clock
        self._trace_id = trace_id  # tests pin it to compare whole answers
        self.accepted: deque[dict[str, Any]] = deque(maxlen=keep)

    def handle(self, api_version: str, pixel_id: str, body: Any) -> tuple[int, dict[str, Any]]:
        """Meta's status and JSON answer for one POST to /{api_version}/{pixel_id}/events."""
        fbtrace_id = self._trace_id()
        try:
            events = self._check(pixel_id, body)
        except _Rejected as exc:
            error: dict[str, Any] = {
                "message": f"(#{exc.code}) {exc}",
                "type": "OAuthException",
                "code": exc.code,
                "error_user_msg": str(exc),
                "fbtrace_id": fbtrace_id,
            }
            if exc.subcode is not None:
                error["error_subcode"] = exc.subcode
            return 400, {"error": error}
        redacted = {
            k: ("[redacted]" if k in ("access_token", "appsecret_proof") else v)
            for k, v in body.items()
        }
        self.accepted.append(
            {"received_at": int(self._clock()), "api_version": api_version,
             "pixel_id": pixel_id, "fbtrace_id": fbtrace_id, "body": redacted}
        )  # fmt: skip
        return 200, {"events_received": len(events), "messages": [], "fbtrace_id": fbtrace_id}

    def _check(self, pixel_id: str, body: Any) -> list[Any]:
        if not isinstance(body, dict):
            raise _Rejected("The request body must be a JSON object")
        if not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise _Rejected("An active access token must be used", code=190)
        if not pixel_id.isdigit():
            raise _Rejected("Unsupported post request: unknown pixel id")
        events = body.get("data")
        if not isinstance(events, list) or not events:
            raise _Rejected("The parameter data is required and must be a non-empty array")
        if len(events) > 1000:
            raise _Rejected("A request may carry at most 1000 events")
        now = self._clock()
        for index, event in enumerate(events):
            self._check_event(index, event, now)
        return events

    @staticmethod
    def _check_event(index: int, event: Any, now: float) -> None:
        where = f"data[{index}]"
        if not isinstance(event, dict):
            raise _Rejected(f"{where} must be an object")
        for key in ("event_name", "event_time", "action_source", "user_data"):
            if key not in event:
                raise _Rejected(f"{where}: the parameter {key} is required")
        event_time, source = event["event_time"], event["action_source"]
        if not isinstance(event_time, int) or isinstance(event_time, bool):
            raise _Rejected(f"{where}: event_time must be an integer Unix timestamp in seconds")
        if source not in _ACTION_SOURCES:
            raise _Rejected(f"{where}: action_source is not one of the allowed values")
        days = 62 if source == "physical_store" else 7
        if event_time < now - days * 86400:
            raise _Rejected(f"{where}: event_time is more than {days} days in the past")
        if event_time > now + 60:
            raise _Rejected(f"{where}: event_time is in the future")
        user_data = event["user_data"]
        if not isinstance(user_data, dict) or not user_data:
            raise _Rejected(
                f"{where}: user_data needs at least one customer information parameter",
                subcode=SUBCODE_INSUFFICIENT_CUSTOMER_INFO,
            )
        if source == "website" and (
            not event.get("event_source_url") or not user_data.get("client_user_agent")
        ):
            raise _Rejected(f"{where}: website events need event_source_url and client_user_agent")
        for key in _MUST_BE_HASHED:
            values = user_data.get(key)
            if values is None:
                continue
            values = values if isinstance(values, list) else [values]
            if not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in values):
                raise _Rejected(
                    f"{where}: user_data.{key} must be SHA-256 hashed (64 lowercase hex)"
                )
        if "client_ip_address" in user_data:
            try:
                ipaddress.ip_address(user_data["client_ip_address"])
            except ValueError:
                raise _Rejected(f"{where}: client_ip_address is not a valid IP address") from None
        if any(set(user_data) <= insufficient for insufficient in _BASELINE_INSUFFICIENT):
            raise _Rejected(
                f"{where}: insufficient customer information to match the event",
                subcode=SUBCODE_INSUFFICIENT_CUSTOMER_INFO,
            )


def _json(status: int, content: Any) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def sandbox_app(sandbox: SandboxGraph) -> Starlette:
    """`POST /{version}/{pixel}/events` as Graph: a sandboxed server's transport."""

    async def post_events(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        status, answer = sandbox.handle(
            request.path_params["version"], request.path_params["pixel"], body
        )
        return _json(status, answer)

    return Starlette(routes=[Route("/{version}/{pixel}/events", post_events, methods=["POST"])])
