"""The one error tree. Every failure a caller can see is a `FunnelgateError`.

    FunnelgateError (status, code, message, retryable)
    ├── BadRequest ............ 400 INVALID_JSON / INVALID_REQUEST
    │   └── InvalidParameters . 400 INVALID_PARAMETERS (+ errors: [{path, message}])
    ├── IntegrationNotEnabled . 400 INTEGRATION_NOT_ENABLED
    ├── CredentialNotFound .... 400 CREDENTIAL_NOT_FOUND
    ├── Unauthorized .......... 401 UNAUTHORIZED
    ├── Forbidden ............. 403 INTEGRATION_FORBIDDEN / CREDENTIAL_FORBIDDEN
    ├── NotFound .............. 404 UNKNOWN_PROJECT / UNKNOWN_TOOL / NOT_FOUND
    ├── IdempotencyInProgress . 409 IDEMPOTENCY_IN_PROGRESS (retryable, Retry-After)
    ├── MethodNotAllowed ...... 405 METHOD_NOT_ALLOWED
    ├── PayloadTooLarge ....... 413 PAYLOAD_TOO_LARGE
    ├── IdempotencyKeyReused .. 422 IDEMPOTENCY_KEY_REUSED
    ├── UnsupportedMediaType .. 415 UNSUPPORTED_MEDIA_TYPE
    ├── Overloaded ............ 503 OVERLOADED (retryable, Retry-After)
    │   ├── QueueFull ......... 503 QUEUE_FULL (retryable, Retry-After)
    │   └── StorageUnavailable  503 STORAGE_UNAVAILABLE (retryable, Retry-After)
    ├── NotReady .............. 503 NOT_READY: GET /readyz only (+ down: [...], Retry-After)
    ├── UpstreamError ......... Graph API failures (+ event_ids, upstream: {...})
    │   ├── UpstreamRejected .. 400 UPSTREAM_REJECTED
    │   ├── UpstreamAuth ...... 502 UPSTREAM_AUTH
    │   └── UpstreamUnavailable UPSTREAM_UNAVAILABLE: never answered; the runner queues the
    │                           events and answers 202 (it is recorded as the events' error)
    └── InternalError ......... 500 INTERNAL_ERROR (a bug)

`ConfigError` is separate: it stops start-up and never reaches a caller. The tools' own
`tools.base.InvalidEvent` carries no status: the runner turns it into `InvalidParameters`.
Messages never carry raw customer data, tokens or keys.
"""

from __future__ import annotations

from typing import Any

from tools.base import Violation

MAX_VIOLATIONS = 100  # an invalid call lists at most this many (README, Limits)


class ConfigError(Exception):
    """A configuration problem; the message is one line naming the problem."""


class FunnelgateError(Exception):
    status = 500
    code = "INTERNAL_ERROR"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "code": self.code, "retryable": self.retryable}

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries (RFC 9110: Allow on 405, Retry-After when a retry
        can help; RFC 6750: WWW-Authenticate on 401)."""
        return {}


class BadRequest(FunnelgateError):
    status = 400
    code = "INVALID_JSON"


class InvalidParameters(BadRequest):
    code = "INVALID_PARAMETERS"

    def __init__(self, violations: list[Violation], *, more: bool = False) -> None:
        more = more or len(violations) > MAX_VIOLATIONS
        violations = violations[:MAX_VIOLATIONS]
        first = violations[0]
        count = f"{len(violations) - 1}{'+' if more else ''}"
        others = f" (and {count} more)" if len(violations) > 1 or more else ""
        super().__init__(f"{first.path}: {first.message}{others}")
        self.violations = violations
        self.more = more  # violations past the listed ones were not looked for

    def body(self) -> dict[str, Any]:
        body = {
            **super().body(),
            "errors": [{"path": v.path, "message": v.message} for v in self.violations],
        }
        if self.more:
            body["errors_truncated"] = True
        return body


class IntegrationNotEnabled(FunnelgateError):
    status = 400
    code = "INTEGRATION_NOT_ENABLED"

    def __init__(self) -> None:
        # ActionKit clients string-match this exact text.
        super().__init__("Integration not enabled for user.")


class CredentialNotFound(FunnelgateError):
    """`X-Paragon-Credential` names no credential of this user (the value is not echoed: an
    external id may be an e-mail address)."""

    status = 400
    code = "CREDENTIAL_NOT_FOUND"

    def __init__(self) -> None:
        super().__init__("No credential with this id for this user.")


class Forbidden(FunnelgateError):
    """The token's JWT Permissions do not grant this (server/permissions.py)."""

    status = 403


class Unauthorized(FunnelgateError):
    status = 401
    code = "UNAUTHORIZED"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="funnelgate"'}


class NotFound(FunnelgateError):
    status = 404
    code = "NOT_FOUND"


class MethodNotAllowed(FunnelgateError):
    status = 405
    code = "METHOD_NOT_ALLOWED"

    def __init__(self, allowed: str) -> None:
        super().__init__("Method not allowed on this path.")
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allowed}


class IdempotencyKeyReused(FunnelgateError):
    """The draft's 422: the key already names another request."""

    status = 422
    code = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was already used with a different request in the last 24 "
            "hours; send a new key for a new request."
        )


class IdempotencyInProgress(FunnelgateError):
    """The draft's 409: the first call with this key has not answered yet."""

    status = 409
    code = "IDEMPOTENCY_IN_PROGRESS"
    retryable = True

    def __init__(self) -> None:
        super().__init__(
            "A call with this Idempotency-Key is still in progress; retry shortly with the "
            "same key to get its answer."
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class PayloadTooLarge(FunnelgateError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(FunnelgateError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"


class Overloaded(FunnelgateError):
    status = 503
    code = "OVERLOADED"
    retryable = True

    def __init__(self) -> None:
        super().__init__("funnelgate is at its limit of calls in progress; retry shortly.")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class QueueFull(Overloaded):
    code = "QUEUE_FULL"

    def __init__(self, limit: int) -> None:
        FunnelgateError.__init__(
            self,
            f"funnelgate's queue holds its limit of {limit} undelivered events "
            "([delivery] max_queued_events); retry later.",
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "30"}  # the queue drains at Meta's pace, not in a second


class StorageUnavailable(Overloaded):
    code = "STORAGE_UNAVAILABLE"

    def __init__(self, *, reading: bool = False) -> None:
        FunnelgateError.__init__(
            self,
            "funnelgate's storage did not answer; nothing was sent or queued."
            if reading
            else "funnelgate could not write the events to its storage; nothing was queued.",
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class NotReady(FunnelgateError):
    """The readiness probe's answer while a part the calls need is down; `down` names them
    (`storage`, `dispatcher`)."""

    status = 503
    code = "NOT_READY"
    retryable = True

    def __init__(self, down: list[str]) -> None:
        super().__init__(f"Not ready: {', '.join(down)} down.")
        self.down = down

    def body(self) -> dict[str, Any]:
        return {**super().body(), "down": self.down}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class UpstreamError(FunnelgateError):
    """Graph API failed; `upstream` holds what Meta said (never the request), `event_ids`
    the events of the failed request (resending them with these ids stays deduplicated)."""

    def __init__(
        self,
        message: str,
        upstream: dict[str, Any],
        *,
        event_ids: list[str],
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.event_ids = event_ids
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        return {**super().body(), "event_ids": self.event_ids, "upstream": self.upstream}

    def for_caller(self, event_ids: list[str]) -> UpstreamError:
        """The same failure for one of several callers sharing a request: its own events."""
        return type(self)(
            self.message, dict(self.upstream), event_ids=event_ids, status=self.status
        )


class UpstreamRejected(UpstreamError):
    status = 400
    code = "UPSTREAM_REJECTED"


class UpstreamAuth(UpstreamError):
    status = 502
    code = "UPSTREAM_AUTH"


class UpstreamUnavailable(UpstreamError):
    status = 502
    code = "UPSTREAM_UNAVAILABLE"
    retryable = True

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}  # Meta's outages outlast a burst of quick retries


class InternalError(FunnelgateError):
    """A bug. Not retryable: the same request would most likely meet the same bug, and a
    call without `eventId` would get a new id, so a blind retry could send an event twice."""

    status = 500
    code = "INTERNAL_ERROR"
    retryable = False

    def __init__(self) -> None:
        super().__init__("Internal error.")
