"""meta_send_conversion_event: one CAPI server event in CAPI's own snake_case shape, as the
MCP tool of that name defines it; answers in markdown (default) or JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tools.base import (
    FACEBOOK_ADS,
    Answer,
    BuildContext,
    EventBatch,
    InvalidEvent,
    JsonAnswer,
    Parameters,
    TextAnswer,
    Tool,
    Violation,
)
from tools.capi import map_raw_event, pixel_violations, prefixed

NAME = "meta_send_conversion_event"
_NOT_EVENT_FIELDS = ("pixel_id", "test_event_code", "response_format")


def build(parameters: Parameters, ctx: BuildContext) -> EventBatch:
    raw = {k: v for k, v in parameters.items() if k not in _NOT_EVENT_FIELDS}
    warnings: list[Violation] = []
    event, violations = map_raw_event(raw, ctx, prefixed("parameters."), warnings=warnings)
    violations = pixel_violations(parameters["pixel_id"], "parameters.pixel_id") + violations
    if violations:
        raise InvalidEvent(violations)
    test_code = parameters.get("test_event_code") or ctx.test_event_code
    return EventBatch(
        pixel_id=parameters["pixel_id"],
        events=[event],
        test_event_code=test_code,
        warnings=warnings,
    )


def present(answer: Mapping[str, Any], parameters: Parameters) -> Answer:
    """Meta's answer as JSON, or (the default) a short markdown summary for people and agents."""
    if parameters.get("response_format") == "json":
        return JsonAnswer(answer)
    lines = [
        f"**Meta received {answer.get('events_received', 0)} event(s)** "
        f"for pixel `{parameters['pixel_id']}` ({parameters['event_name']}).",
        f"- fbtrace_id: `{answer.get('fbtrace_id', 'n/a')}`",
    ]
    if test_code := parameters.get("test_event_code"):
        lines.append(f"- test event code: `{test_code}` (see Events Manager > Test Events)")
    lines += [f"- message: {message}" for message in answer.get("messages") or []]
    lines += [f"- warning: {w['path']}: {w['message']}" for w in answer.get("warnings") or []]
    lines += [f"- warning: {warning}" for warning in advice(parameters)]
    return TextAnswer("\n".join(lines), "text/markdown; charset=utf-8")


def advice(parameters: Parameters) -> list[str]:
    """What Meta accepts but ads optimisation will miss."""
    custom = parameters.get("custom_data") or {}
    if parameters.get("event_name") == "Purchase" and not {"value", "currency"} <= custom.keys():
        return ["Purchase events should carry custom_data.value and custom_data.currency."]
    return []


TOOL = Tool(
    name=NAME,
    title="Send Conversion Event (CAPI)",  # the name MCP hosts already show for this tool
    integration=FACEBOOK_ADS,
    description=(
        "Send a server-side conversion event to Meta using the Conversions API. Supports "
        "standard and custom events with deduplication for accurate attribution. user_data keys "
        "given raw are normalised and SHA-256 hashed; already-hashed values pass through."
    ),
    schema=NAME,
    build=build,
    present=present,
)
