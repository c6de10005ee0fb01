"""FACEBOOK_ADS_SEND_LEAD_EVENT: the funnel event's parameters without `eventName`; the
event is always `Lead`."""

from __future__ import annotations

from tools import actionkit
from tools.base import FACEBOOK_ADS, BuildContext, EventBatch, Parameters, Tool

NAME = "FACEBOOK_ADS_SEND_LEAD_EVENT"


def build(parameters: Parameters, ctx: BuildContext) -> EventBatch:
    return actionkit.build_event(parameters, ctx, event_name="Lead")


TOOL = Tool(
    name=NAME,
    title="Send Lead Event",
    integration=FACEBOOK_ADS,
    description=(
        "Send a Lead event (a customer submitted their details, for example a sign-up or "
        "contact form) to a Meta Pixel through the Conversions API. Customer details are "
        "normalised and SHA-256 hashed before they leave the server."
    ),
    schema=NAME,
    extensions=(actionkit.EXTENSIONS,),
    build=build,
)
