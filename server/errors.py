"""The one error tree. Every failure a caller can see is a `FunnelgateError`.

    FunnelgateError (status, code, message, retryable)
    ├── BadRequest ............ 400 INVALID_JSON / INVALID_REQUEST
    │   └── InvalidParameters . 400 INVALID_PARAMETERS (+ errors: [{path, message}])
    ├── IntegrationNotEnabled . 400 INTEGRATION_NOT_ENABLED
    ├── Unauthorized .......... 401 UNAUTHORIZED
    ├── NotFound .............. 404 UNKNOWN_PROJECT / UNKNOWN_TOOL / NOT_FOUND
    ├── MethodNotAllowed ...... 405 METHOD_NOT_ALLOWED
    ├── PayloadTooLarge ....... 413 PAYLOAD_TOO_LARGE
    ├── UnsupportedMediaType .. 415 UNSUPPORTED_MEDIA_TYPE
    └── UpstreamError ......... Graph API failures (+ event_ids, upstream: {...})
        ├── UpstreamRejected .. 400 UPSTREAM_REJECTED
        ├── UpstreamAuth ...... 502 UPSTREAM_AUTH
        └── UpstreamUnavailable 502 / 504 UPSTREAM_UNAVAILABLE (retryable)

`ConfigError` is separate: it stops start-up and never reaches a caller.
Messages never carry raw customer data, tokens or keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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


class BadRequest(FunnelgateError):
    status = 400
    code = "INVALID_JSON"


@dataclass(frozen=True)
class Violation:
    """One reason a parameter is unacceptable; `path` is dotted, e.g. `parameters.eventTime`."""

    path: str
    message: str


class InvalidParameters(BadRequest):
    code = "INVALID_PARAMETERS"

    def __init__(self, violations: list[Violation]) -> None:
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(f"{first.path}: {first.message}{more}")
        self.violations = violations

    def body(self) -> dict[str, Any]:
        return {
            **super().body(),
            "errors": [{"path": v.path, "message": v.message} for v in self.violations],
        }


class IntegrationNotEnabled(FunnelgateError):
    status = 400
    code = "INTEGRATION_NOT_ENABLED"

    def __init__(self) -> None:
        # ActionKit clients string-match this exact text.
        super().__init__("Integration not enabled for user.")


class Unauthorized(FunnelgateError):
    status = 401
    code = "UNAUTHORIZED"


class NotFound(FunnelgateError):
    status = 404
    code = "NOT_FOUND"


class MethodNotAllowed(FunnelgateError):
    status = 405
    code = "METHOD_NOT_ALLOWED"


class PayloadTooLarge(FunnelgateError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(FunnelgateError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"


class UpstreamError(FunnelgateError):
    """Graph API failed; `upstream` holds what Meta said (never the request)."""

    def __init__(
        self, message: str, upstream: dict[str, Any], *, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.event_ids: list[str] = []
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        return {**super().body(), "event_ids": self.event_ids, "upstream": self.upstream}

    def for_caller(self) -> UpstreamError:
        """The same failure as a new object, for one of several callers sharing a request."""
        return type(self)(self.message, dict(self.upstream), status=self.status)


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
