"""Conversions API server events: building `user_data`, and the checks Meta rejects events for.

Rules from Meta's docs (server event, customer information, best practices; capi-facts.md).
Each check reports the caller's own parameter path via a `paths` map from CAPI field to
parameter, so the same rules serve every tool's naming. Pure: `now` is passed in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from server.errors import Violation
from tools.hashing import HASHED_KEYS, NormalizationError, hash_value, is_sha256_hex, normalize

ACTION_SOURCES = (
    "email", "website", "app", "phone_call", "chat", "physical_store", "system_generated",
    "business_messaging", "other",
)  # fmt: skip
MAX_EVENTS_PER_REQUEST = 1000
MAX_AGE_SECONDS = 7 * 86400
MAX_AGE_SECONDS_PHYSICAL_STORE = 62 * 86400
MAX_FUTURE_SECONDS = 60

# An event whose customer information is only one of these sets (or a subset) fails Meta's
# baseline matching rule.
_BASELINE_INSUFFICIENT = (
    frozenset({"ct", "country", "st", "zp", "ge", "client_user_agent"}),
    frozenset({"db", "client_user_agent"}),
    frozenset({"fn", "ge"}),
    frozenset({"ln", "ge"}),
)

Paths = Mapping[str, str]


def build_user_data(
    raw: Mapping[str, str | None], paths: Paths
) -> tuple[dict[str, Any], list[Violation]]:
    """CAPI `user_data` from raw values keyed by CAPI key: hashed keys normalised and hashed,
    the others (IP, user agent, fbc, fbp, ...) kept exactly, case included. Empty values are
    dropped, never hashed. Violations name the parameter, never its value."""
    user_data: dict[str, Any] = {}
    violations: list[Violation] = []
    country = _plain_country(raw.get("country"))  # steers the US-only rules for st and zp
    for key, value in raw.items():
        if value is None or not value.strip():
            continue
        try:
            if key in HASHED_KEYS:
                hashed = hash_value(key, value, country=country)
                if hashed is not None:
                    user_data[key] = [hashed]
            elif key == "client_ip_address":
                user_data[key] = str(ipaddress.ip_address(value.strip()))
            else:
                user_data[key] = value.strip()
        except (NormalizationError, ValueError) as exc:
            message = str(exc) if isinstance(exc, NormalizationError) else "is not an IP address"
            violations.append(Violation(paths.get(key, key), message))
    return user_data, violations


def _plain_country(value: str | None) -> str | None:
    if value is None or is_sha256_hex(value.strip().lower()):
        return None
    try:
        return normalize("country", value)
    except NormalizationError:
        return None  # reported where the country itself is hashed


def check_event(event: Mapping[str, Any], *, now: float, paths: Paths) -> list[Violation]:
    """What Meta would reject this server event for; [] when it would be accepted."""
    violations: list[Violation] = []

    def fail(field: str, message: str) -> None:
        violations.append(Violation(paths.get(field, field), message))

    source = event.get("action_source")
    event_time = event["event_time"]
    max_age = MAX_AGE_SECONDS_PHYSICAL_STORE if source == "physical_store" else MAX_AGE_SECONDS
    if event_time < now - max_age:
        fail("event_time", f"is more than {max_age // 86400} days in the past; Meta rejects it")
    elif event_time > now + MAX_FUTURE_SECONDS:
        fail("event_time", "is in the future; Meta rejects it")
    url = event.get("event_source_url")
    if url is not None and not url.startswith(("http://", "https://")):
        fail("event_source_url", "must be an http:// or https:// URL")
    user_data: Mapping[str, Any] = event.get("user_data", {})
    if source == "website":
        if url is None:
            fail("event_source_url", "is required when actionSource is website")
        if "client_user_agent" not in user_data:
            fail("user_data.client_user_agent", "is required when actionSource is website")
    keys = frozenset(user_data)
    if not keys:
        fail("user_data", "needs at least one customer identifier")
    elif any(keys <= insufficient for insufficient in _BASELINE_INSUFFICIENT):
        fail(
            "user_data",
            "does not identify a customer well enough for Meta (baseline matching): add an "
            "email, phone, external id, click id, browser id or IP address",
        )
    return violations
