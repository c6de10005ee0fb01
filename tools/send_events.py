"""FACEBOOK_ADS_SEND_EVENTS: 1 to 1,000 CAPI server events for one pixel, in one request.

Meta rejects a whole batch for one bad event, so every event is checked first and any
violation refuses the call, naming the event by its index; nothing is sent.
"""

from __future__ import annotations

from tools.base import (
    FACEBOOK_ADS,
    BuildContext,
    EventBatch,
    InvalidEvent,
    Parameters,
    Tool,
    Violation,
)
from tools.capi import map_raw_event, pixel_violations, prefixed

NAME = "FACEBOOK_ADS_SEND_EVENTS"


def build(parameters: Parameters, ctx: BuildContext) -> EventBatch:
    violations: list[Violation] = pixel_violations(parameters["pixel_id"], "parameters.pixel_id")
    warnings: list[Violation] = []
    events = []
    for index, raw in enumerate(parameters["events"]):
        path_of = prefixed(f"parameters.events[{index}].")
        event, event_violations = map_raw_event(raw, ctx, path_of, warnings=warnings)
        events.append(event)
        violations += event_violations
    if violations:
        raise InvalidEvent(violations)
    test_code = parameters.get("test_event_code") or ctx.test_event_code
    return EventBatch(
        pixel_id=parameters["pixel_id"], events=events, test_event_code=test_code, warnings=warnings
    )


TOOL = Tool(
    name=NAME,
    title="Send Events (Batch)",
    integration=FACEBOOK_ADS,
    description=(
        "Send 1 to 1,000 Conversions API server events to one Meta Pixel in a single request. "
        "Each event uses CAPI's own field names; customer data is normalised and SHA-256 "
        "hashed. If any event is invalid the whole call is refused before anything is sent."
    ),
    schema=NAME,
    build=build,
)
