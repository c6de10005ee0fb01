"""The camelCase ActionKit Facebook Ads tools' parameters -> one CAPI server event.

Shared by FACEBOOK_ADS_SEND_FUNNEL_EVENT and FACEBOOK_ADS_SEND_LEAD_EVENT: the published
parameters, plus funnelgate's optional extension parameters (value, currency, phone, ...),
which never change what a published parameter means. The mapping table is in the README.
"""

from __future__ import annotations

from typing import Any

from tools.base import BuildContext, EventBatch, InvalidEvent, Parameters, Violation
from tools.capi import build_user_data, check_event, pixel_violations
from tools.values import parse_content_ids, parse_event_time

# The openapi.json component holding funnelgate's extension parameters.
EXTENSIONS = "FACEBOOK_ADS_EXTENSIONS"

# Customer parameters -> CAPI user_data keys (the last four are extensions).
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
    "customerPhone": "ph",
    "customerZip": "zp",
    "customerGender": "ge",
    "customerDateOfBirth": "db",
}
# Extension parameters copied as they are -> custom_data keys.
CUSTOM_DATA_FIELDS = {
    "contentName": "content_name",
    "contentCategory": "content_category",
    "value": "value",
    "currency": "currency",
    "orderId": "order_id",
    "contents": "contents",
    "numItems": "num_items",
}
# Parameter -> (True for user_data, False for custom_data; its CAPI key): one lookup each.
_DESTINATIONS = {
    **{name: (True, key) for name, key in USER_DATA_FIELDS.items()},
    **{name: (False, key) for name, key in CUSTOM_DATA_FIELDS.items()},
}
# CAPI field -> the parameter a violation names.
_PATHS = {
    "event_name": "parameters.eventName",
    "event_time": "parameters.eventTime",
    "event_source_url": "parameters.eventSourceUrl",
    "user_data": "parameters",
    # These tools carry no app_data, so an app event is refused for its actionSource (it
    # can go through meta_send_conversion_event, which carries app_data).
    "app_data": "parameters.actionSource",
    **{f"user_data.{key}": f"parameters.{name}" for name, key in USER_DATA_FIELDS.items()},
}


def _path_of(field: str) -> str:
    return _PATHS.get(field, "parameters")


def _text(parameters: Parameters, name: str) -> str | None:
    value = parameters.get(name)
    if not value or not isinstance(value, str):
        return None
    return value.strip() or None  # empty strings are dropped, as if absent


def build_event(parameters: Parameters, ctx: BuildContext, *, event_name: str | None) -> EventBatch:
    """One server event from schema-valid parameters (`event_name` fixed, or from
    `eventName`); raises InvalidEvent with every reason Meta would reject it."""
    pixel = _text(parameters, "pixel") or ""
    violations = pixel_violations(pixel, "parameters.pixel")

    # One pass sorts the parameters (schema-valid: customer values are strings) by destination.
    raw_user: dict[str, str] = {}
    custom_data: dict[str, Any] = {}
    for name, value in parameters.items():
        if (destination := _DESTINATIONS.get(name)) is None:
            continue
        if destination[0]:
            raw_user[destination[1]] = value  # build_user_data drops blank ones
        elif value != "":
            custom_data[destination[1]] = value.strip() if isinstance(value, str) else value
    warnings: list[Violation] = []
    user_data, user_violations = build_user_data(
        raw_user, _path_of, phone_region=ctx.phone_region, now=ctx.now, warnings=warnings
    )
    violations += user_violations

    event_time, time_ok = int(ctx.now), True
    if (raw_time := _text(parameters, "eventTime")) is not None:
        try:
            event_time = parse_event_time(raw_time)
        except ValueError:
            message = "must be an ISO 8601 timestamp, e.g. 2026-03-31T12:02:00Z"
            violations.append(Violation("parameters.eventTime", message))
            time_ok = False

    if (content_id := _text(parameters, "contentId")) is not None:
        try:
            if ids := parse_content_ids(content_id):
                custom_data = {"content_ids": ids, **custom_data}
        except ValueError as exc:
            violations.append(Violation("parameters.contentId", str(exc)))

    event: dict[str, Any] = {
        "event_name": event_name or _text(parameters, "eventName") or "",
        "event_time": event_time,
        "action_source": parameters["actionSource"],
        "event_id": _text(parameters, "eventId") or ctx.new_event_id(),
        "user_data": user_data,
    }
    if (url := _text(parameters, "eventSourceUrl")) is not None:
        event["event_source_url"] = url
    if custom_data:
        event["custom_data"] = custom_data
    if "optOut" in parameters:
        event["opt_out"] = parameters["optOut"]
    if "dataProcessingOptions" in parameters:
        event["data_processing_options"] = parameters["dataProcessingOptions"]

    if time_ok:  # else the event's checks would only repeat the problem
        violations += check_event(event, now=ctx.now, path_of=_path_of)
    if violations:
        raise InvalidEvent(violations)
    test_code = _text(parameters, "testEventCode") or ctx.test_event_code
    return EventBatch(pixel_id=pixel, events=[event], test_event_code=test_code, warnings=warnings)
