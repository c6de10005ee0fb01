"""Customer data through the tools' mapping: what is sent to Meta, what is refused, and the
warnings the caller gets for what was dropped or changed in meaning. Pure: no server."""

from __future__ import annotations

import hashlib
import time
import unicodedata
from typing import Any

import pytest

from tests.support import NOW, PIXEL, PROJECT, funnel_parameters
from tools import funnel_event
from tools.base import BuildContext, EventBatch, InvalidEvent, Violation
from tools.capi import build_user_data, map_raw_event, pixel_violations, prefixed

# A bound on wall time that linear work meets on any machine, however loaded, and that a
# catastrophic pattern misses by far (the SDK's e-mail regex took 20 s on 256 KiB).
NOT_CATASTROPHIC_SECONDS = 1.0

PHONE_EXTENSION = "has an extension: it was dropped, Meta matches the number without it"
PHONE_CODE_ADDED = (
    "has no country code: the code of the customer's country (else of the project's "
    "default_phone_region) was added"
)
PHONE_NOT_SENT = (
    "has no country code and no country is known for it (send +<country code>, the "
    "customer's country, or set the project's default_phone_region): not sent"
)
ZIP4_CUT = "is a US ZIP+4 code: only its first five digits are sent (Meta's rule)"
NOTHING_LEFT = "has nothing left once normalised as Meta requires: not sent"


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def ctx(region: str | None = None) -> BuildContext:
    return BuildContext(now=NOW, new_event_id=lambda: "generated", phone_region=region)


def funnel(region: str | None = None, **overrides: Any) -> EventBatch:
    return funnel_event.build(funnel_parameters(**overrides), ctx(region))


def assert_no_value_echoed(violations: list[Violation], *values: str) -> None:
    for violation in violations:
        for value in values:
            assert value.strip().lower() not in violation.message.lower()


# --- ActionKit tools: warnings in the EventBatch ------------------------------------------------


def test_rewrites_that_change_meaning_are_warned_by_parameter_and_never_echo_values() -> None:
    sent = {
        "customerPhone": "+1 650 555 1212 ext. 123",
        "customerZip": "94107-1234",
        "customerCity": unicodedata.normalize("NFD", "São Paulo"),
        "customerDateOfBirth": "2/16/1997",
    }
    batch = funnel(**sent)
    user_data = batch.events[0]["user_data"]
    assert user_data["ph"] == [sha("16505551212")]
    assert user_data["zp"] == [sha("94107")]
    assert user_data["ct"] == [sha("sãopaulo")]  # composed, as Meta's examples
    assert user_data["db"] == [sha("19970216")]
    assert batch.warnings == [
        Violation("parameters.customerPhone", PHONE_EXTENSION),
        Violation("parameters.customerZip", ZIP4_CUT),
    ]
    assert_no_value_echoed(batch.warnings, *sent.values(), "16505551212", "123", "94107")


def test_plain_customer_data_gives_no_warning() -> None:
    batch = funnel(customerPhone="+44 (0)20 7946 0958", customerZip="94107",
                   customerGender="Female", customerDateOfBirth="1997-02-16")  # fmt: skip
    assert batch.warnings == []
    assert batch.events[0]["user_data"]["ph"] == [sha("442079460958")]
    assert EventBatch(pixel_id=PIXEL, events=[]).warnings == []


def test_phone_without_country_code_or_region_is_not_sent_and_the_event_still_goes() -> None:
    batch = funnel(customerPhone="(650) 555-1212", customerCountryCode=None)
    assert "ph" not in batch.events[0]["user_data"]
    assert "em" in batch.events[0]["user_data"]
    assert batch.warnings == [Violation("parameters.customerPhone", PHONE_NOT_SENT)]


def test_phone_takes_the_customers_country_before_the_projects_default_region() -> None:
    batch = funnel("US", customerPhone="0170 1234567", customerCountryCode="DE")
    assert batch.events[0]["user_data"]["ph"] == [sha("491701234567")]
    assert batch.warnings == [Violation("parameters.customerPhone", PHONE_CODE_ADDED)]


@pytest.mark.parametrize("country", [None, sha("us"), "AQ"])
def test_phone_falls_back_to_the_projects_default_region(country: str | None) -> None:
    batch = funnel("US", customerPhone="(650) 555-1212", customerCountryCode=country)
    assert batch.events[0]["user_data"]["ph"] == [sha("16505551212")]
    assert batch.warnings == [Violation("parameters.customerPhone", PHONE_CODE_ADDED)]


def test_phone_with_its_country_code_is_not_given_the_region_again() -> None:
    batch = funnel("DE", customerPhone="16505551212", customerCountryCode=None)
    assert batch.events[0]["user_data"]["ph"] == [sha("16505551212")]
    assert batch.warnings == []


@pytest.mark.parametrize("phone", ["555-1212", "5551212", "555-12"])
def test_too_short_phone_is_refused_not_prefixed(phone: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        funnel("US", customerPhone=phone)
    [violation] = caught.value.violations
    assert violation.path == "parameters.customerPhone"
    assert_no_value_echoed([violation], phone)


@pytest.mark.parametrize("city", ["75008", "123 456", "---"])
def test_value_with_nothing_left_is_not_sent_and_said(city: str) -> None:
    batch = funnel(customerCity=city)
    assert "ct" not in batch.events[0]["user_data"]
    assert batch.warnings == [Violation("parameters.customerCity", NOTHING_LEFT)]


@pytest.mark.parametrize("value", ["2/16/1997", "1997-2-16", "1997 02 16", "19970216"])
def test_date_of_birth_forms_of_metas_page_are_accepted(value: str) -> None:
    batch = funnel(customerDateOfBirth=value)
    assert batch.events[0]["user_data"]["db"] == [sha("19970216")]


def test_date_of_birth_in_the_future_of_the_events_clock_is_refused() -> None:
    # NOW is 2026-11-18 UTC; the 19th is still today somewhere, the 20th is not.
    assert funnel(customerDateOfBirth="2026-11-19").events[0]["user_data"]["db"]
    with pytest.raises(InvalidEvent) as caught:
        funnel(customerDateOfBirth="2026-11-20")
    assert caught.value.violations == [
        Violation("parameters.customerDateOfBirth", "is in the future")
    ]


def test_over_long_customer_value_is_refused_fast_by_parameter() -> None:
    email = "@" * (256 * 1024)
    started = time.perf_counter()
    with pytest.raises(InvalidEvent) as caught:
        funnel(customerEmail=email)
    assert time.perf_counter() - started < NOT_CATASTROPHIC_SECONDS
    assert caught.value.violations == [
        Violation("parameters.customerEmail", "is longer than 254 characters")
    ]


# --- CAPI-shaped user_data: lists, item paths, warnings through map_raw_event -----------------


def raw_event(**user_data: Any) -> dict[str, Any]:
    return {"event_name": "Lead", "event_time": int(NOW) - 60, "action_source": "email",
            "user_data": {"em": "joe@example.com", **user_data}}  # fmt: skip


def test_list_items_are_warned_and_refused_by_index() -> None:
    warnings: list[Violation] = []
    event, violations = map_raw_event(
        raw_event(
            ph=["+1 650 555 1212 ext 1", "(650) 555-1212", "+16505551212", " "],
            zp=["12345-6789", "00-950"],
            ct=["Paris", "75008"],
        ),
        ctx(),
        prefixed("parameters."),
        warnings=warnings,
    )
    assert violations == []
    assert event["user_data"]["ph"] == [sha("16505551212")]  # deduplicated
    assert event["user_data"]["zp"] == [sha("12345"), sha("00950")]
    assert event["user_data"]["ct"] == [sha("paris")]
    assert warnings == [
        Violation("parameters.user_data.ph[0]", PHONE_EXTENSION),
        Violation("parameters.user_data.ph[1]", PHONE_NOT_SENT),
        Violation("parameters.user_data.zp[0]", ZIP4_CUT),
        Violation("parameters.user_data.ct[1]", NOTHING_LEFT),
    ]


def test_bad_list_item_is_named_by_index_and_the_others_still_checked() -> None:
    _event, violations = map_raw_event(
        raw_event(em=["joe@example.com", "nope"], db=["1997-02-16", "16/02/1997"]),
        ctx(),
        prefixed("parameters.events[2]."),
    )
    assert [v.path for v in violations] == [
        "parameters.events[2].user_data.em[1]",
        "parameters.events[2].user_data.db[1]",
    ]
    assert "month first" in violations[1].message


def test_warnings_are_optional_and_map_raw_event_keeps_its_answer() -> None:
    event, violations = map_raw_event(raw_event(ph="(650) 555-1212"), ctx(), prefixed("p."))
    assert violations == [] and "ph" not in event["user_data"]


def test_build_user_data_uses_now_for_the_date_of_birth() -> None:
    def path(field: str) -> str:
        return field

    _user, violations = build_user_data({"db": "2026-11-20"}, path, now=NOW)
    assert violations == [Violation("user_data.db", "is in the future")]
    _user, violations = build_user_data({"db": "2026-11-20"}, path, now=NOW + 2 * 86400)
    assert violations == []


@pytest.mark.parametrize("pixel", ["123", "1" * 32])
def test_pixel_id_is_digits_only(pixel: str) -> None:
    assert pixel_violations(pixel, "p") == []


FULL_WIDTH_123 = "\uff11\uff12\uff13"


@pytest.mark.parametrize(
    "pixel", ["123\n", " 123", "12a", "", "1" * 33, FULL_WIDTH_123, "1" * 300_000]
)
def test_pixel_id_with_anything_else_is_refused_quickly(pixel: str) -> None:
    started = time.perf_counter()
    assert pixel_violations(pixel, "p") == [Violation("p", "must be a numeric Pixel (dataset) ID")]
    assert time.perf_counter() - started < NOT_CATASTROPHIC_SECONDS


# --- needs the tools/meta_conversion_event.py and tools/send_events.py change -------------------


def test_snake_case_tools_carry_warnings_by_event_and_item() -> None:
    from tools import meta_conversion_event, send_events

    one = meta_conversion_event.build(
        {"pixel_id": PIXEL, **raw_event(ph="(650) 555-1212", zp="12345-6789")}, ctx()
    )
    assert one.warnings == [
        Violation("parameters.user_data.ph", PHONE_NOT_SENT),
        Violation("parameters.user_data.zp", ZIP4_CUT),
    ]
    batch = send_events.build(
        {"pixel_id": PIXEL, "events": [raw_event(), raw_event(ph=["+1 650 555 1212 x9"])]}, ctx()
    )
    assert batch.warnings == [Violation("parameters.events[1].user_data.ph[0]", PHONE_EXTENSION)]


# --- through Run Tool: the caller is told, in the answer and in a dry run ---------------------


def _run(client, sign, parameters: dict[str, Any], query: str = ""):
    return client.post(
        f"/projects/{PROJECT}/tools{query}",
        json={"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": parameters},
        headers={"Authorization": f"Bearer {sign()}"},
    )


def test_run_tool_answers_with_the_warnings_and_dry_run_shows_them(client, graph, sign):
    parameters = funnel_parameters(customerCountryCode=None, customerPhone="(650) 555-1212",
                                   customerZip="94105-1234")  # fmt: skip
    expected = [{"path": "parameters.customerPhone", "message": PHONE_NOT_SENT},
                {"path": "parameters.customerZip", "message": ZIP4_CUT}]  # fmt: skip
    dry = _run(client, sign, parameters, "?dry_run=true").json()
    assert dry["warnings"] == expected
    response = _run(client, sign, parameters)
    assert response.status_code == 200
    assert response.json()["warnings"] == expected
    assert "ph" not in graph.bodies()[0]["data"][0]["user_data"]
    assert "650" not in response.text and "94105" not in response.text  # values never echoed


def test_an_answer_without_warnings_is_metas_answer_unchanged(client, sign):
    assert "warnings" not in _run(client, sign, funnel_parameters()).json()
