"""FACEBOOK_ADS_SEND_FUNNEL_EVENT: Paragon ActionKit's published tool, parameter for parameter.

Its published parameters schema sits verbatim in openapi.json; funnelgate's optional
extensions are a separate schema there, merged by the catalog.
"""

from __future__ import annotations

from tools import actionkit
from tools.base import FACEBOOK_ADS, BuildContext, EventBatch, Parameters, Tool

NAME = "FACEBOOK_ADS_SEND_FUNNEL_EVENT"


def build(parameters: Parameters, ctx: BuildContext) -> EventBatch:
    return actionkit.build_event(parameters, ctx, event_name=None)


TOOL = Tool(
    name=NAME,
    title="Send Funnel Event",
    integration=FACEBOOK_ADS,
    description=(
        "Send a funnel event (for example AddToCart, InitiateCheckout or Purchase) for a "
        "customer to a Meta Pixel through the Conversions API. Customer details are normalised "
        "and SHA-256 hashed before they leave the server."
    ),
    schema=NAME,
    extensions=(actionkit.EXTENSIONS,),
    build=build,
)
