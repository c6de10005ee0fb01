"""tools.values: ISO 8601 event times and the string forms of content id lists."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from tools.values import parse_content_ids, parse_event_time

MAY_1_10H_UTC = 1714557600  # 2024-05-01T10:00:00Z
MAY_1_MIDNIGHT_UTC = 1714521600  # 2024-05-01T00:00:00Z


@pytest.fixture
def local_zone_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with a non-UTC local zone, so 'no zone means UTC' cannot pass by accident."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("2024-05-01T10:00:00Z", MAY_1_10H_UTC, id="z-suffix"),
        pytest.param("2024-05-01T12:00:00+02:00", MAY_1_10H_UTC, id="plus-two-offset"),
        pytest.param("2024-05-01T05:00:00-05:00", MAY_1_10H_UTC, id="minus-five-offset"),
        pytest.param("2024-05-01T10:00:00.999Z", MAY_1_10H_UTC, id="fraction-truncated"),
        pytest.param("2024-05-01T10:00:00.123456+00:00", MAY_1_10H_UTC, id="microseconds"),
        pytest.param("  2024-05-01T10:00:00Z ", MAY_1_10H_UTC, id="surrounding-whitespace"),
        pytest.param("2024-05-01T10:00:00", MAY_1_10H_UTC, id="no-zone-is-utc"),
        pytest.param("2024-05-01 10:00:00", MAY_1_10H_UTC, id="space-separator"),
        pytest.param("2024-05-01", MAY_1_MIDNIGHT_UTC, id="date-only-is-utc-midnight"),
    ],
)
@pytest.mark.usefixtures("local_zone_not_utc")
def test_parse_event_time(value: str, expected: int) -> None:
    assert parse_event_time(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "yesterday", "1714557600", "2024-13-01", "2024-05-01T25:00:00Z", "01/05/2024"],
)
def test_parse_event_time_rejects_non_iso_input(value: str) -> None:
    with pytest.raises(ValueError):
        parse_event_time(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("ABC123", ["ABC123"], id="single-id"),
        pytest.param(" ABC123 , XYZ789,QQ1 ", ["ABC123", "XYZ789", "QQ1"], id="comma-list"),
        pytest.param('["ABC123", "XYZ789"]', ["ABC123", "XYZ789"], id="json-array"),
        pytest.param("['ABC123', 'XYZ789']", ["ABC123", "XYZ789"], id="documented-python-form"),
        pytest.param("[ABC123, XYZ789]", ["ABC123", "XYZ789"], id="bracketed-bare-ids"),
        pytest.param("['a,b', \"c, d\"]", ["a,b", "c, d"], id="quoted-commas-kept"),
        pytest.param(r"['it\'s', 'x']", ["it's", "x"], id="escaped-quote"),
        pytest.param('[123, "456"]', ["123", "456"], id="json-numbers"),
        pytest.param("123", ["123"], id="bare-number"),
        pytest.param("A,,B, ,", ["A", "B"], id="empty-entries-dropped"),
        pytest.param("['A', , 'B', '', ]", ["A", "B"], id="empty-bracketed-entries-dropped"),
        pytest.param('["A", " ", ""]', ["A"], id="empty-json-entries-dropped"),
        pytest.param("   ", [], id="blank"),
        pytest.param("[]", [], id="empty-list"),
    ],
)
def test_parse_content_ids(value: str, expected: list[str]) -> None:
    assert parse_content_ids(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("['ABC123', 'XYZ789'", id="missing-close-bracket"),
        pytest.param("'ABC123', 'XYZ789']", id="missing-open-bracket"),
        pytest.param("['ABC123, 'XYZ789']", id="unbalanced-quote"),
        pytest.param("['ABC123' 'XYZ789']", id="missing-comma"),
        pytest.param("[true, false]", id="json-booleans"),
        pytest.param("[1.5]", id="json-float"),
        pytest.param("[null]", id="json-null"),
        pytest.param('[["ABC123"]]', id="nested-list"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="deeply-nested"),
    ],
)
def test_parse_content_ids_rejects_malformed_lists(value: str) -> None:
    with pytest.raises(ValueError):
        parse_content_ids(value)


@pytest.mark.parametrize(
    "value", ["__import__('os').system('x')", "[__import__('os').system('x')]"]
)
def test_parse_content_ids_never_evaluates_its_input(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(os, "system", calls.append)
    assert parse_content_ids(value) == ["__import__('os').system('x')"]
    assert calls == []


@pytest.mark.parametrize(
    "value",
    [
        "[a" + " " * 100_000 + "b]",
        "[" + " " * 100_000 + "'x]",
        "['" + "a" * 100_000 + "'b, c]",
    ],
)
def test_parse_content_ids_is_fast_on_long_runs(value: str) -> None:
    started = time.perf_counter()
    with contextlib.suppress(ValueError):
        parse_content_ids(value)
    assert time.perf_counter() - started < 1.0


BIG = 256 * 1024
ADVERSARIAL = {
    "quotes": "[" + "'" * BIG + "]",
    "escaped-quotes": "['" + "\\'" * (BIG // 2) + "]",
    "backslashes": "['" + "\\" * BIG + "']",
    "commas": "[" + "," * BIG + "]",
    "quoted-items-no-commas": "[" + "'a' " * (BIG // 4) + "]",
    "open-quote-then-spaces": "['a" + " " * BIG + "]",
    "bare-then-spaces": "[a" + " ," * (BIG // 2) + "]",
    "unclosed-double-quotes": '["' + 'a",' * (BIG // 3) + "]",
    "brackets": "[" * BIG,
    "digits": "1" * BIG,
    "iso-like": "2024-05-01T10:00:00" + "0" * BIG,
}


@pytest.mark.parametrize("value", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_every_parser_is_linear_on_256_kib_adversarial_input(value: str) -> None:
    """Gross bounds: linear passes take well under 0.3 s here, a backtracking pattern
    (quadratic or worse) takes many seconds."""
    for parse in (parse_content_ids, parse_event_time):
        started = time.perf_counter()
        with contextlib.suppress(ValueError):
            parse(value)
        assert time.perf_counter() - started < 1.0, parse.__name__
