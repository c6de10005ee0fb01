"""What to do with a Graph API answer: a table from status/error code to a verdict.

Meta's `type` is often OAuthException even for throttling, so the table reads `code`.
Sources: Meta's Graph API error handling
(https://developers.facebook.com/docs/graph-api/guides/error-handling) and the Conversions API
best practices (https://developers.facebook.com/docs/marketing-api/conversions-api/best-practices).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # transient: same payload, same event_id, after a backoff
    REJECTED = "rejected"  # Meta refused the events themselves: never resend
    AUTH = "auth"  # token or permission problem: resending cannot help


TRANSIENT_CODES = frozenset({1, 2, 4, 17, 32, 341, 368, 613, *range(80000, 80015)})
AUTH_CODES = frozenset({3, 10, 102, 190, *range(200, 300)})

Rule = tuple[str, Callable[[int, Mapping[str, Any]], bool], Verdict]

# First matching row wins.
POLICY: tuple[Rule, ...] = (
    ("2xx", lambda status, _: 200 <= status < 300, Verdict.DELIVERED),
    ("is_transient", lambda _, err: err.get("is_transient") is True, Verdict.RETRY),
    ("transient code", lambda _, err: err.get("code") in TRANSIENT_CODES, Verdict.RETRY),
    ("auth code", lambda _, err: err.get("code") in AUTH_CODES, Verdict.AUTH),
    ("HTTP 5xx", lambda status, _: status >= 500, Verdict.RETRY),
    ("HTTP 429", lambda status, _: status == 429, Verdict.RETRY),
    ("HTTP 401/403", lambda status, _: status in (401, 403), Verdict.AUTH),
    ("anything else", lambda _status, _err: True, Verdict.REJECTED),
)


def classify(status: int, error: Mapping[str, Any]) -> Verdict:
    """Verdict for one HTTP answer; `error` is Graph's `error` object, or {} if there was none."""
    for _name, matches, verdict in POLICY:
        if matches(status, error):
            return verdict
    raise AssertionError("the last rule matches everything")


def backoff_seconds(
    attempt: int, *, base: float = 0.2, cap: float = 2.0, rand: Callable[[], float] = random.random
) -> float:
    """Full-jitter exponential backoff before attempt `attempt + 1` (attempts count from 1)."""
    return rand() * min(cap, base * 2.0 ** (attempt - 1))
