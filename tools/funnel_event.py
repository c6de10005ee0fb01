"""FACEBOOK_ADS_SEND_FUNNEL_EVENT: Paragon ActionKit's published tool, parameter for parameter.

The parameters schema is the published one, verbatim, in openapi.json. Mapping table (README):
camelCase parameter -> CAPI server event field.
"""

from __future__ import annotations

import re

from server.errors import InvalidParameters, Violation
from tools.base import BuildContext, EventBatch, Parameters
from tools.capi import build_user_data, check_event
from tools.values import parse_content_ids, parse_event_time

NAME = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"
INTEGRATION = "facebookAds"
DESCRIPTION = (
    "Send a funnel event (for example Lead, AddToCart or Purchase) for a customer to a Meta "
    "Pixel through the Conversions API. Customer details are normalised and SHA-256 hashed "
    "before they leave the server."
)

# Customer parameters -> CAPI user_data keys.
USER_DATA_FIELDS = {
    "customerEmail": "em",
    "customerFirstName": "fn",
    "customerLastName": "ln",
    "customerCity": "ct",
    "customerState": "st",
    "customerCountryCode": "country",
    "customerExternalId": "external_id",
    "customerClientIpAddress": "client_ip_address",
    "customerClientUserAgent": "client_user_agent",
    "clickId": "fbc",
    "browserId": "fbp",
}
# CAPI field -> the parameter path a violation names.
PATHS = {
    "event_time": "parameters.eventTime",
    "event_source_url": "parameters.eventSourceUrl",
    "user_data": "parameters",
    **{f"user_data.{key}": f"parameters.{p}" for p, key in USER_DATA_FIELDS.items()},
    **{key: f"parameters.{p}" for p, key in USER_DATA_FIELDS.items()},
}

_PIXEL_ID = re.compile(r"\d{1,32}")


def _text(parameters: Parameters, name: str) -> str | None:
    value = parameters.get(name)
    if not isinstance(value, str) or not value.strip():
        return None  # empty strings are dropped, as if absent
    return value.strip()


def build(parameters: Parameters, ctx: BuildContext) -> EventBatch:
    """One server event from schema-valid parameters; raises InvalidParameters with every
    reason Meta would reject it. Sends nothing and reads no clock but `ctx.now`."""
    violations: list[Violation] = []
    pixel = _text(parameters, "pixel") or ""
    if _PIXEL_ID.fullmatch(pixel) is None:
        violations.append(Violation("parameters.pixel", "must be a numeric Pixel (dataset) ID"))
    event_name = _text(parameters, "eventName")
    if event_name is None:
        violations.append(Violation("parameters.eventName", "must not be empty"))

    event_time = int(ctx.now)
    if (raw_time := _text(parameters, "eventTime")) is not None:
        try:
            event_time = parse_event_time(raw_time)
        except ValueError:
            violations.append(
                Violation(
                    "parameters.eventTime",
                    "must be an ISO 8601 timestamp, e.g. 2026-03-31T12:02:00Z",
                )
            )

    user_data, user_violations = build_user_data(
        {key: _text(parameters, p) for p, key in USER_DATA_FIELDS.items()}, PATHS
    )
    violations += user_violations

    custom_data: dict[str, object] = {}
    if (content_id := _text(parameters, "contentId")) is not None:
        try:
            if ids := parse_content_ids(content_id):
                custom_data["content_ids"] = ids
        except ValueError as exc:
            violations.append(Violation("parameters.contentId", str(exc)))
    for param, key in (("contentName", "content_name"), ("contentCategory", "content_category")):
        if (text := _text(parameters, param)) is not None:
            custom_data[key] = text

    event: dict[str, object] = {
        "event_name": event_name,
        "event_time": event_time,
        "action_source": parameters["actionSource"],
        "event_id": _text(parameters, "eventId") or ctx.new_event_id(),
        "user_data": user_data,
    }
    if (url := _text(parameters, "eventSourceUrl")) is not None:
        event["event_source_url"] = url
    if custom_data:
        event["custom_data"] = custom_data

    if not any(v.path == "parameters.eventTime" for v in violations):
        violations += check_event(event, now=ctx.now, paths=PATHS)
    if violations:
        raise InvalidParameters(violations)
    return EventBatch(pixel_id=pixel, events=[event])
