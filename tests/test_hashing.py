"""tools.hashing: parity with Meta's SDK, the documented places we go beyond it, errors, vectors."""

from __future__ import annotations

import hashlib
import traceback
import unicodedata

import pytest
from facebook_business.adobjects.serverside.normalize import Normalize
from facebook_business.adobjects.serverside.user_data import UserData

from tools.hashing import (
    HASHED_KEYS,
    NormalizationError,
    country_code,
    hash_value,
    is_sha256_hex,
    normalize,
    sha256_hex,
)

REJECTED = "<rejected by the SDK>"
HASHED = hashlib.sha256(b"joe@example.com").hexdigest()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sdk(key: str, value: str) -> str:
    """What Meta's SDK sends for this input, or REJECTED."""
    try:
        return str(Normalize.normalize_field(key, value))
    except (TypeError, ValueError):
        return REJECTED


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


# --- SDK oracle: every input here is accepted by the SDK, and we must send the SDK's hash ----

SDK_PARITY = [
    pytest.param("em", "Joe@Example.COM", id="em-mixed-case"),
    pytest.param("em", "  joe@example.com\t", id="em-surrounding-whitespace"),
    pytest.param("em", "joe @example.com", id="em-inner-space-kept"),
    pytest.param("em", "Joe+Newsletter@Example.co.uk", id="em-plus-addressing"),
    pytest.param("em", "josé@exämple.com", id="em-unicode"),
    pytest.param("em", HASHED, id="em-sha256-lower-passes-through"),
    pytest.param("em", HASHED.upper(), id="em-sha256-upper-passes-through-lowercased"),
    pytest.param("fn", "  JOHN ", id="fn-case-and-whitespace"),
    pytest.param("fn", "José", id="fn-accent-nfc"),
    pytest.param("fn", nfd("Zoë"), id="fn-accent-nfd-combining-mark"),
    pytest.param("fn", "Zoë", id="fn-diaeresis"),
    pytest.param("fn", "Mary Ann", id="fn-inner-space-kept"),
    pytest.param("fn", "정", id="fn-hangul"),
    pytest.param("fn", "太郎", id="fn-cjk"),
    pytest.param("fn", HASHED.upper(), id="fn-sha256-passes-through"),
    pytest.param("ln", "Łukasiewicz", id="ln-polish"),
    pytest.param("ln", "山田", id="ln-cjk"),
    pytest.param("ln", " SMITH", id="ln-case"),
    pytest.param("ct", "St. Louis", id="ct-dot-and-space"),
    pytest.param("ct", "New York", id="ct-space"),
    pytest.param("ct", "Winston-Salem", id="ct-hyphen"),
    pytest.param("ct", "Mexico (DF)", id="ct-parentheses"),
    pytest.param("ct", "Paris 75008", id="ct-digits"),
    pytest.param("ct", "Łódź", id="ct-polish"),
    pytest.param("ct", "São Paulo", id="ct-accent-nfc"),
    pytest.param("ct", nfd("São Paulo"), id="ct-accent-nfd-combining-mark"),
    pytest.param("ct", "नई दिल्ली", id="ct-devanagari-vowel-signs"),
    pytest.param("ct", "東京", id="ct-cjk"),
    pytest.param("st", "CA", id="st-upper-code"),
    pytest.param("st", "ca", id="st-lower-code"),
    pytest.param("st", " Ca ", id="st-padded-code"),
    pytest.param("st", "N.Y.", id="st-dotted-code"),
    pytest.param("st", "Île-de-France", id="st-non-us-region"),
    pytest.param("st", "Bayern", id="st-non-us-name"),
    pytest.param("zp", "12345", id="zp-five-digits"),
    pytest.param("zp", "12345-6789", id="zp-plus-four-with-dash"),
    pytest.param("zp", " 94 107 ", id="zp-spaces"),
    pytest.param("zp", "SW1A 1AA", id="zp-uk-postcode"),
    pytest.param("zp", "H0H 0A0", id="zp-canadian-postcode"),
    pytest.param("country", "US", id="country-upper"),
    pytest.param("country", "us", id="country-lower"),
    pytest.param("country", "U.S.", id="country-dotted"),
    pytest.param("country", "gb", id="country-gb"),
    pytest.param("country", " DE ", id="country-padded"),
    pytest.param("ph", "+1 (650) 555-1234", id="ph-formatted-e164"),
    pytest.param("ph", "0044 20 7946 0958", id="ph-00-prefix"),
    pytest.param("ph", "16505551234", id="ph-digits"),
    pytest.param("ph", "1-650-555-1234", id="ph-dashes"),
    pytest.param("ph", "+44 7911 123456", id="ph-uk-mobile"),
    pytest.param("ph", "(650)555-1212", id="ph-no-country-code-not-invented"),
    pytest.param("ph", HASHED, id="ph-sha256-passes-through"),
    pytest.param("ge", " F ", id="ge-f"),
    pytest.param("ge", "m", id="ge-m"),
    pytest.param("db", "19900102", id="db-yyyymmdd"),
]


@pytest.mark.parametrize(("key", "value"), SDK_PARITY)
def test_hashes_like_the_sdk_on_inputs_the_sdk_accepts(key: str, value: str) -> None:
    expected = Normalize.normalize_field(key, value)  # raising here means a bad corpus entry
    assert hash_value(key, value) == expected


# --- Beyond the SDK: each test pins our value and shows that the SDK differs -----------------


@pytest.mark.parametrize("country", [None, "us"])
@pytest.mark.parametrize(
    ("state", "code"),
    [("New York", "ny"), ("california", "ca"), ("  District of Columbia ", "dc")],
)
def test_beyond_sdk_us_state_name_becomes_its_code(
    state: str, code: str, country: str | None
) -> None:
    assert hash_value("st", state, country=country) == sha(code)
    assert sdk("st", state) != sha(code)  # the SDK hashes "newyork"


def test_state_name_is_kept_as_a_name_outside_the_us() -> None:
    assert hash_value("st", "New York", country="gb") == sha("newyork") == sdk("st", "New York")


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("United States", "us"),
        ("USA", "us"),
        ("U.S.A.", "us"),
        ("deu", "de"),
        ("Germany", "de"),
        ("UK", "gb"),
        ("Turkey", "tr"),
    ],
)
def test_beyond_sdk_country_name_or_alpha3_becomes_alpha2(name: str, code: str) -> None:
    assert hash_value("country", name) == sha(code)
    assert sdk("country", name) == REJECTED  # the SDK takes ISO alpha-2 only


def test_country_code_accepts_raw_input_in_any_case() -> None:
    assert [country_code(v) for v in ("U.S.", " UK ", "Germany", "FRA")] == ["us", "gb", "de", "fr"]


@pytest.mark.parametrize("country", [None, "us"])
def test_beyond_sdk_us_zip_plus_four_without_dash_keeps_first_five(country: str | None) -> None:
    assert hash_value("zp", "123456789", country=country) == sha("12345")
    assert sdk("zp", "123456789") == sha("123456789")


def test_nine_digit_postcode_outside_the_us_is_kept_whole() -> None:
    assert hash_value("zp", "123456789", country="gb") == sha("123456789")


def test_beyond_sdk_postcode_dash_outside_the_us_is_removed_not_cut() -> None:
    assert hash_value("zp", "00-950", country="pl") == sha("00950")
    assert sdk("zp", "00-950") == sha("00")


@pytest.mark.parametrize(
    ("key", "value", "country", "normal"),
    [
        ("fn", "O'Brien", None, "obrien"),
        ("ln", "Smith-Jones", None, "smithjones"),
        ("ln", "D'Alembert, Jr.", None, "dalembert jr"),
        ("ct", "L'Aquila", None, "laquila"),
        ("ct", "Fort Smith & Van Buren", None, "fortsmithvanburen"),
        ("st", "Provence-Alpes-Côte d'Azur", "fr", "provencealpescôtedazur"),
    ],
)
def test_beyond_sdk_punctuation_is_removed_from_names_and_places(
    key: str, value: str, country: str | None, normal: str
) -> None:
    assert hash_value(key, value, country=country) == sha(normal)
    assert sdk(key, value) != sha(normal)  # the SDK keeps apostrophes, commas, ampersands


def test_beyond_sdk_external_id_is_hashed() -> None:
    raw = UserData(external_id="User-42").normalize()["external_id"]
    assert raw == ["User-42"]  # the SDK sends external_id as given
    assert hash_value("external_id", " User-42 ") == sha("user-42")


def test_beyond_sdk_md5_is_hashed_not_passed_through() -> None:
    md5 = hashlib.md5(b"joe").hexdigest()
    assert sdk("fn", md5) == md5  # the SDK treats it as already hashed
    assert hash_value("fn", md5) == sha(md5)


def test_beyond_sdk_phone_digits_of_any_script_become_ascii() -> None:
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in "16505551234")  # U+FF11 ...
    assert hash_value("ph", full_width) == sha("16505551234")
    assert sdk("ph", full_width) == sha(full_width)


def test_beyond_sdk_phone_longer_than_e164_is_rejected() -> None:
    too_long = "1234567890123456"
    assert sdk("ph", too_long) == sha(too_long)
    with pytest.raises(NormalizationError):
        hash_value("ph", too_long)


@pytest.mark.parametrize("value", ["1990-01-02", "1990/01/02", "1990.01.02"])
def test_beyond_sdk_date_of_birth_becomes_yyyymmdd(value: str) -> None:
    assert hash_value("db", value) == sha("19900102")
    assert sdk("db", value) == sha(value)  # the SDK hashes db as given


@pytest.mark.parametrize(("value", "code"), [("Female", "f"), (" MALE ", "m")])
def test_beyond_sdk_gender_word_becomes_its_letter(value: str, code: str) -> None:
    assert hash_value("ge", value) == sha(code)
    assert sdk("ge", value) == sha(value.strip().lower())


# --- Nothing to send: None, never the hash of "" ---------------------------------------------


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
@pytest.mark.parametrize("key", sorted(HASHED_KEYS))
def test_empty_or_whitespace_value_gives_none(key: str, value: str) -> None:
    assert normalize(key, value) is None
    assert hash_value(key, value) is None


@pytest.mark.parametrize(("key", "value"), [("ct", "123"), ("st", "--"), ("zp", " - ")])
def test_value_with_nothing_left_after_normalising_gives_none(key: str, value: str) -> None:
    assert hash_value(key, value) is None
    assert sdk(key, value) == sha("")  # where the SDK would send the hash of ""


# --- Errors name the problem, never the value ------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        pytest.param("em", "Secret.Person-at-example.com", id="email-without-at"),
        pytest.param("em", "secret@localhost", id="email-without-dot"),
        pytest.param("country", "Narnia", id="unknown-country"),
        pytest.param("country", "ZZ", id="unknown-alpha2"),
        pytest.param("db", "1990-13-45", id="date-impossible-month"),
        pytest.param("db", "19900231", id="date-february-31"),
        pytest.param("db", "18991231", id="date-before-1900"),
        pytest.param("db", "yesterday", id="date-words"),
        pytest.param("ge", "Unspecified", id="gender-other-word"),
        pytest.param("ge", "Mx", id="gender-title-mx"),
        pytest.param("ge", "frog", id="gender-word-starting-with-f"),
        pytest.param("ph", "555-12", id="phone-too-short"),
    ],
)
def test_invalid_value_raises_without_echoing_it(key: str, raw: str) -> None:
    with pytest.raises(NormalizationError) as caught:
        hash_value(key, raw)
    assert isinstance(caught.value, ValueError)
    report = "".join(traceback.format_exception(caught.value)).lower()
    assert str(caught.value)
    assert raw.lower() not in report


# --- Known answers ---------------------------------------------------------------------------

# Expected outputs published in Meta's customer information parameters docs, plus FIPS 180-2.
META_VECTORS = [
    (
        "em",
        "John_Smith@gmail.com",
        "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f",
    ),
    ("ph", "+1 (650) 555-1212", "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"),
    ("fn", "Mary", "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"),
    ("fn", "정", "8fa8cd9c440be61d0151429310034083132b35975c4bea67fdd74158eb51db14"),
    ("fn", "Valéry", "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c"),
    ("external_id", "ABC", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
]


@pytest.mark.parametrize(("key", "value", "digest"), META_VECTORS)
def test_published_vectors(key: str, value: str, digest: str) -> None:
    assert hash_value(key, value) == digest


def test_sha256_hex_is_lowercase_hex_of_utf8() -> None:
    assert sha256_hex("joe@example.com") == HASHED
    assert sha256_hex("zoë") == hashlib.sha256("zoë".encode()).hexdigest()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (HASHED, True),
        (HASHED.upper(), False),  # callers lowercase first, as hash_value does
        (HASHED[:-1], False),
        (HASHED[:-1] + "g", False),
        (hashlib.md5(b"joe").hexdigest(), False),
    ],
)
def test_is_sha256_hex(value: str, expected: bool) -> None:
    assert is_sha256_hex(value) is expected
