"""Conversions API server events: building `user_data`, mapping a raw CAPI event, and the
checks Meta rejects events for.

Rules from Meta's pages: server event parameters
(https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/server-event),
customer information parameters
(https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters)
and best practices (https://developers.facebook.com/docs/marketing-api/conversions-api/best-practices).
Every function reports the caller's own parameter path through `path_of` (CAPI field ->
parameter path), so one set of rules serves every tool's naming. Pure: `now` is passed in.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from tools import hashing
from tools.base import BuildContext, Violation
from tools.hashing import HASHED_KEYS, NormalizationError, hash_value, is_sha256_hex

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

PathOf = Callable[[str], str]
UserDataValue = str | list[str] | None


_PIXEL_ID = re.compile(r"[0-9]{1,32}")


def pixel_violations(pixel_id: str, path: str) -> list[Violation]:
    """Pixel ids are numeric; checking keeps a crafted id from reshaping the Graph URL. The id
    is checked exactly as it will be used (`"123\n"` is refused, not stripped)."""
    if len(pixel_id) <= 32 and _PIXEL_ID.fullmatch(pixel_id):
        return []
    return [Violation(path, "must be a numeric Pixel (dataset) ID")]


def prefixed(prefix: str) -> PathOf:
    """Paths for tools whose parameters carry CAPI's own names, e.g. `parameters.user_data.em`."""
    return lambda field: f"{prefix}{field}"


def build_user_data(
    raw: Mapping[str, UserDataValue],
    path_of: PathOf,
    *,
    phone_region: str | None = None,
    now: float | None = None,
    warnings: list[Violation] | None = None,
) -> tuple[dict[str, Any], list[Violation]]:
    """CAPI `user_data` from raw values keyed by CAPI key (`path_of` gets `user_data.<key>`).

    Hashed keys are normalised and SHA-256 hashed, one value or a list (deduplicated, order
    kept; a problem names the item, `user_data.ph[1]`); the others (IP, user agent, fbc,
    fbp, ...) are kept exactly, case included. Empty values are dropped, never hashed. A
    phone number without a country code is placed in the customer's country, else in
    `phone_region` (the project's default). `now` (Unix seconds) bounds a date of birth.
    What was dropped or changed in meaning is appended to `warnings` (tools/hashing.py says
    which); violations are what Meta would reject. Both name the parameter, never its value.
    """
    user_data: dict[str, Any] = {}
    violations: list[Violation] = []
    country = _plain_country(raw.get("country"))  # steers the US-only rules for st and zp
    region = hashing.phone_region(country, phone_region) if "ph" in raw else None
    today = None if now is None or "db" not in raw else datetime.fromtimestamp(now, UTC).date()

    notes: list[str] | None = None if warnings is None else []  # reused: cleared after use
    for key, value in raw.items():
        if not value:
            continue
        try:
            if isinstance(value, str):
                # A single value and a list of them take separate loops on purpose: one shared
                # loop cost ~2 µs per event (bench/map_core.py), this runs for every event.
                if key in HASHED_KEYS:
                    digest = hash_value(
                        key, value, country=country, phone_region=region, today=today, notes=notes
                    )
                    if digest is not None:
                        user_data[key] = [digest]
                    if notes is not None and (notes or digest is None):
                        _warn(warnings, notes, value, _path(path_of, key))
                elif not (text := value.strip()):
                    continue
                elif key != "client_ip_address":
                    user_data[key] = text
                elif (address := _ip_address(text)) is not None:
                    user_data[key] = address
                else:
                    raise NormalizationError("is not an IP address")
            elif key in HASHED_KEYS:
                hashes = []
                for index, item in enumerate(value):  # an item's problem names its index
                    where = f"{_path(path_of, key)}[{index}]"
                    try:
                        digest = hash_value(
                            key, item, country=country, phone_region=region, today=today,
                            notes=notes,
                        )  # fmt: skip
                    except NormalizationError as exc:
                        violations.append(Violation(where, str(exc)))
                        continue
                    if digest is not None:
                        hashes.append(digest)
                    if notes is not None and (notes or digest is None):
                        _warn(warnings, notes, item, where)
                if hashes:
                    user_data[key] = list(dict.fromkeys(hashes))
        except NormalizationError as exc:
            violations.append(Violation(_path(path_of, key), str(exc)))
    return user_data, violations


_NOTHING_LEFT = "has nothing left once normalised as Meta requires: not sent"


def _path(path_of: PathOf, key: str) -> str:
    return path_of(f"user_data.{key}")


def _warn(warnings: list[Violation] | None, notes: list[str], value: str, path: str) -> None:
    """Move `notes` into `warnings`; a value dropped without a note of its own (nothing left
    after normalising) says so. A blank value was never there: no warning."""
    if warnings is not None and (notes or value.strip()):
        warnings.extend(Violation(path, note) for note in notes or [_NOTHING_LEFT])
    notes.clear()


def _ip_address(text: str) -> str | None:
    """A valid IP address, IPv6 in its compressed form; None when `text` is not one."""
    try:
        socket.inet_pton(socket.AF_INET, text)  # the common case, ten times cheaper
    except (OSError, ValueError):  # ValueError: an embedded NUL
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            return None
    return text


def _plain_country(value: UserDataValue) -> str | None:
    first = value if isinstance(value, str) else next(iter(value or []), None)
    if first is None or is_sha256_hex(first.strip().lower()):
        return None
    try:
        return hashing.country_code(first)  # checks the length first
    except NormalizationError:
        return None  # reported where the country itself is hashed


def map_raw_event(
    raw: Mapping[str, Any],
    ctx: BuildContext,
    path_of: PathOf,
    *,
    warnings: list[Violation] | None = None,
) -> tuple[dict[str, Any], list[Violation]]:
    """A server event from CAPI-shaped, schema-valid input (snake_case, Unix `event_time`).

    `user_data` is normalised and hashed as in `build_user_data` (its warnings go to
    `warnings`); everything else passes through; `event_id` is generated when absent so
    retries deduplicate.
    """
    user_data, violations = build_user_data(
        raw.get("user_data", {}),
        path_of,
        phone_region=ctx.phone_region,
        now=ctx.now,
        warnings=warnings,
    )
    event = {k: v for k, v in raw.items() if v not in (None, "")}
    event["user_data"] = user_data
    event.setdefault("event_time", int(ctx.now))
    if "event_id" not in event:  # not setdefault: a new id costs a system call
        event["event_id"] = ctx.new_event_id()
    violations += check_event(event, now=ctx.now, path_of=path_of)
    return event, violations


def check_event(event: Mapping[str, Any], *, now: float, path_of: PathOf) -> list[Violation]:
    """What Meta would reject this server event for; [] when it would be accepted."""
    violations: list[Violation] = []

    def fail(field: str, message: str) -> None:
        violations.append(Violation(path_of(field), message))

    source = event.get("action_source")
    event_time = event["event_time"]
    max_age = MAX_AGE_SECONDS_PHYSICAL_STORE if source == "physical_store" else MAX_AGE_SECONDS
    if event_time < now - max_age:
        fail("event_time", f"is more than {max_age // 86400} days in the past; Meta rejects it")
    elif event_time > now + MAX_FUTURE_SECONDS:
        fail("event_time", "is in the future; Meta rejects it")
    if not str(event.get("event_name", "")).strip():
        fail("event_name", "must not be empty")
    url = event.get("event_source_url")
    if url is not None and not url.startswith(("http://", "https://")):
        fail("event_source_url", "must be an http:// or https:// URL")
    user_data: Mapping[str, Any] = event.get("user_data", {})
    if source == "website":
        if url is None:
            fail("event_source_url", "is required for website events")
        if "client_user_agent" not in user_data:
            fail("user_data.client_user_agent", "is required for website events")
    if source == "app" and not event.get("app_data"):
        fail("app_data", "app events need app_data (Meta requires it)")
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


def match_keys(event: Mapping[str, Any]) -> list[str]:
    """The customer keys an event carries, for users checking their match quality."""
    return sorted(event.get("user_data", {}))
