"""Plain readings of a pixel's match-key coverage: what would raise Meta's match quality, in
sentences such as "38 % of Purchase events carry only an IP address and a user agent".

Meta matches an event to a person by its customer information parameters; the more of them,
and the more specific (e-mail, phone, your own id), the better the event's match quality
(https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters,
https://developers.facebook.com/docs/marketing-api/conversions-api/best-practices). Each rule
below is a row: the count it reads, whether it counts events that have the key or lack it,
the share from which it speaks, whether it applies only to website events, and the sentence.
Sentences come in the rules' order (the gravest first: no key at all, then only an IP and a
user agent), most affected events first within a rule, at most MAX_READINGS of them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple

from server.storage.minutes import Coverage

MAX_READINGS = 8


class Rule(NamedTuple):
    key: str  # a Coverage field
    lacking: bool  # True: the events without it are the ones spoken of
    from_share: float  # speaks when at least this share of the events is concerned
    website_only: bool
    sentence: str  # {share} and {name} are filled in


RULES = (
    Rule("none", False, 0.001, False,
         "{share} of {name} events carry no customer information at all: Meta cannot match "
         "them to anyone."),
    Rule("only_ip_ua", False, 0.05, False,
         "{share} of {name} events carry only an IP address and a user agent: add an e-mail "
         "(em), a phone number (ph) or your customer id (external_id)."),
    Rule("em", True, 0.5, False,
         "{share} of {name} events carry no e-mail (em), one of the keys that raise match "
         "quality most."),
    Rule("ph", True, 0.5, False,
         "{share} of {name} events carry no phone number (ph), one of the keys that raise "
         "match quality most."),
    Rule("external_id", True, 0.5, False,
         "{share} of {name} events carry no external_id: your own customer id lets Meta match "
         "the same person across devices."),
    Rule("ip_ua", True, 0.05, True,
         "{share} of {name} website events lack client_ip_address and client_user_agent: Meta "
         "requires the user agent for website events, and matches better with both."),
    Rule("fbp", True, 0.3, True,
         "{share} of {name} website events carry no browser id (fbp): pass the _fbp cookie."),
    Rule("fbc", True, 0.5, True,
         "{share} of {name} website events carry no click id (fbc): pass the _fbc cookie, or "
         "the fbclid of the landing page's URL, when the visitor came from an ad."),
)  # fmt: skip


def readings(rows: Sequence[Coverage], websites: Collection[str]) -> list[str]:
    """The sentences for one pixel's coverage (per event name; the `*` row is left out) and
    the event names sent with action_source `website`."""
    found: list[tuple[int, int, str]] = []
    for row in rows:
        if row.event_name == "*" or row.total <= 0:
            continue
        for order, rule in enumerate(RULES):
            if rule.website_only and row.event_name not in websites:
                continue
            have = int(getattr(row, rule.key))
            concerned = row.total - have if rule.lacking else have
            share = concerned / row.total
            if concerned > 0 and share >= rule.from_share:
                sentence = rule.sentence.format(share=percent(share), name=_name(row.event_name))
                found.append((order, -concerned, sentence))
    return [sentence for *_, sentence in sorted(found)[:MAX_READINGS]]


def percent(share: float) -> str:
    """`38 %`; a share above 0 that would round to it is `<1 %`, one below 1 is `>99 %`."""
    value = round(share * 100)
    if value == 0 and share > 0:
        return "<1 %"
    if value == 100 and share < 1:
        return ">99 %"
    return f"{value} %"


def _name(event_name: str) -> str:
    return event_name or "unnamed"
