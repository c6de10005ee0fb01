"""Normalise and SHA-256 hash customer information, per Meta's rules.

Rules: https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters
Every input the official SDK (`facebook_business...serverside.normalize.Normalize`) accepts
hashes to the SDK's value, except where Meta's rule goes further than the SDK; each such case
is named in a comment below and pinned by a test:
- fn, ln: punctuation is removed (the SDK keeps apostrophes, hyphens, commas, ...).
- ct, st: only letters and combining marks are kept (the SDK removes just ASCII digits, `.`,
  whitespace, `-`, `(` and `)`, so it keeps apostrophes, commas, `&`, ...).
- st: US state names become their two-letter code; country: names, alpha-3 codes and `UK`
  become alpha-2.
- zp: a US ZIP+4 keeps its first five digits (the SDK already cuts at `-`; we also cut
  `123456789`); outside the US (country given) a dash is removed, not cut at ("00-950").
- ph: a national number gains its country code from the configured default region
  (phonenumbers; the SDK never adds one); non-ASCII digits (e.g. full-width) become ASCII
  digits, and more than 15 digits (longer than E.164 allows) is rejected; the SDK hashes the
  former as they are and accepts the latter.
- db: becomes YYYYMMDD and must be a real date from 1900 on; ge: `f`, `m`, `female` or `male`
  becomes `f` or `m`. The SDK's `normalize_field` hashes both as given (its `UserData` takes
  gender as an enum and leaves date formatting to the caller).
- external_id: hashed as Meta recommends (the SDK's `UserData` sends it raw).
- a 32-hex MD5 is not treated as already hashed: Meta asks for SHA-256.
- a value that normalises to nothing gives None, never the hash of "" (the SDK hashes
  an empty or whitespace-only fn, ln, ct, st, zp, ...).
Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from datetime import date
from functools import lru_cache

import phonenumbers
import pycountry

# Keys whose values Meta expects SHA-256 hashed.
HASHED_KEYS = frozenset(
    {"em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id"}
)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_EMAIL = re.compile(r".+@.+\..+")  # the SDK's own check, so both accept the same inputs
_DATE = re.compile(r"([0-9]{4})[-/.]?([0-9]{2})[-/.]?([0-9]{2})")
_GENDERS = {"f": "f", "m": "m", "female": "f", "male": "m"}
# Common names pycountry does not know (it has "Türkiye", "Russian Federation", ...).
_COUNTRY_ALIASES = {
    "uk": "gb", "greatbritain": "gb", "england": "gb", "scotland": "gb", "wales": "gb",
    "northernireland": "gb", "russia": "ru", "turkey": "tr", "ivorycoast": "ci",
    "holland": "nl", "macedonia": "mk", "vatican": "va", "palestine": "ps",
}  # fmt: skip


class NormalizationError(ValueError):
    """A value that cannot be turned into what Meta expects; the message names no raw value."""


def is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and _SHA256.fullmatch(value) is not None


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# str.translate tables that give ASCII text the same result as the Unicode loops below, at C speed.
_ASCII_DROP_NON_LETTERS = str.maketrans(
    "", "", "".join(c for c in map(chr, range(128)) if not c.isalpha())
)
_ASCII_DROP_PUNCTUATION = str.maketrans(
    "", "", "".join(c for c in map(chr, range(128)) if unicodedata.category(c).startswith("P"))
)


def _letters(value: str) -> str:
    """Letters and combining marks only: Meta's 'no spaces, no punctuation'.

    Digits go too, as in the SDK; marks stay (decomposed accents, Indic vowel signs), as in the
    SDK. Beyond the SDK: apostrophes, commas and other symbols go too.
    """
    if value.isascii():
        return value.translate(_ASCII_DROP_NON_LETTERS)
    return "".join(c for c in value if unicodedata.category(c)[0] in "LM")


def _ascii_digits(value: str) -> str:
    """Decimal digits of any script as ASCII digits; other characters unchanged (beyond the SDK)."""
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in value)


def _without_punctuation(value: str) -> str:
    if value.isascii():
        return value.translate(_ASCII_DROP_PUNCTUATION)
    return "".join(c for c in value if not unicodedata.category(c).startswith("P"))


@lru_cache(maxsize=1024)
def country_code(value: str) -> str:
    """ISO 3166-1 alpha-2, lowercase, from a code, alpha-3 code or English name, any case.

    Beyond the SDK (which takes alpha-2 only): alpha-3 codes, names and `UK` are mapped.
    """
    text = value.strip().lower()
    letters = "".join(c for c in text if "a" <= c <= "z")
    if len(letters) == 2 and pycountry.countries.get(alpha_2=letters):
        return letters
    if len(letters) == 3 and (found := pycountry.countries.get(alpha_3=letters)):
        return str(found.alpha_2).lower()
    if letters in _COUNTRY_ALIASES:
        return _COUNTRY_ALIASES[letters]
    try:
        found = pycountry.countries.lookup(text)
    except LookupError:
        raise NormalizationError("is not an ISO 3166-1 country code or country name") from None
    return str(found.alpha_2).lower()


def _state(value: str, country: str | None) -> str:
    letters = _letters(value)
    if country in (None, "us"):
        return US_STATES.get(letters, letters)  # beyond the SDK: state names become codes
    return letters


def _zip(value: str, country: str | None) -> str:
    compact = "".join(value.split())
    if country not in (None, "us"):
        return compact.replace("-", "")  # "no dash": Poland's 00-950 must not become 00
    compact = compact.split("-")[0]  # US ZIP+4: the first five digits, as the SDK cuts
    if compact.isdigit() and len(compact) == 9:
        return compact[:5]  # ZIP+4 written without its dash
    return compact


def _date_of_birth(value: str) -> str:
    """YYYYMMDD of a real date from 1900 on (Meta's range), written with or without `-`, `/`, `.`.

    Beyond the SDK, which hashes db as given.
    """
    match = _DATE.fullmatch(_ascii_digits(value))
    if match is None:
        raise NormalizationError("must be a date as YYYYMMDD or YYYY-MM-DD")
    year, month, day = match.groups()
    try:
        date(int(year), int(month), int(day))
    except ValueError:
        raise NormalizationError("is not a real calendar date") from None
    if int(year) < 1900:
        raise NormalizationError("must be a date from 1900 on")
    return year + month + day


def _gender(value: str) -> str:
    """f or m, from f, m, female or male (beyond the SDK, which hashes ge as given)."""
    gender = _GENDERS.get(value)
    if gender is None:
        raise NormalizationError("must be f, m, female or male")
    return gender


def _phone(value: str, region: str | None) -> str:
    """E.164 digits. A national number ("(650) 555-1234") needs `region` to gain its country
    code (beyond the SDK, which never adds one); otherwise digits only, leading zeros (`00`
    prefix) gone, any script's digits made ASCII."""
    if region and not value.startswith(("+", "00")):
        try:
            number = phonenumbers.parse(value, region.upper())
        except phonenumbers.NumberParseException:
            raise NormalizationError("is not a phone number") from None
        if not phonenumbers.is_possible_number(number):
            raise NormalizationError(f"is not a possible phone number for region {region.upper()}")
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)[1:]
    digits = "".join(c for c in _ascii_digits(value) if "0" <= c <= "9").lstrip("0")
    if len(digits) < 7 or len(digits) > 15:  # beyond the SDK: E.164 has at most 15 digits
        raise NormalizationError("must be a phone number with its country code")
    return digits


def _email(text: str) -> str:
    if _EMAIL.match(text) is None:
        raise NormalizationError("is not an email address")
    return text


def _name(text: str) -> str:
    return _without_punctuation(text).strip()  # beyond the SDK: punctuation goes


# Per key: (lowercased, stripped text, normalised country, phone region) -> normal form.
_RULES: dict[str, Callable[[str, str | None, str | None], str]] = {
    "em": lambda text, _c, _r: _email(text),
    "fn": lambda text, _c, _r: _name(text),
    "ln": lambda text, _c, _r: _name(text),
    "ct": lambda text, _c, _r: _letters(text),
    "st": lambda text, country, _r: _state(text, country),
    "zp": lambda text, country, _r: _zip(text, country),
    "country": lambda text, _c, _r: country_code(text),
    "db": lambda text, _c, _r: _date_of_birth(text),
    "ge": lambda text, _c, _r: _gender(text),
    "ph": lambda text, _c, region: _phone(text, region),
}


def normalize(
    key: str, value: str, *, country: str | None = None, phone_region: str | None = None
) -> str | None:
    """Meta's normal form of one raw value, or None when nothing is left to send.

    `country` (already normalised) steers the US-only rules for `st` and `zp`;
    `phone_region` (ISO alpha-2) gives national phone numbers their country code.
    Does not hash and does not detect already-hashed input: see `hash_value`.
    """
    text = value.strip().lower()
    if not text:
        return None
    rule = _RULES.get(key)
    return (rule(text, country, phone_region) if rule else text) or None


# Keys whose values repeat across customers (a few hundred countries and states, the
# same cities): their hashes are remembered, bounded. Emails, phones, names and ids are not.
_REPEATING_KEYS = frozenset({"country", "st", "ct", "ge"})


def hash_value(
    key: str, value: str, *, country: str | None = None, phone_region: str | None = None
) -> str | None:
    """SHA-256 hex of the normalised value; a value already 64-hex passes through (lowercased).

    A 32-hex MD5 is hashed like any other value (the SDK passes it through).
    """
    if key in _REPEATING_KEYS:
        return _hash_repeating(key, value, country)
    return _hash(key, value, country, phone_region)


@lru_cache(maxsize=4096)
def _hash_repeating(key: str, value: str, country: str | None) -> str | None:
    return _hash(key, value, country, None)


def _hash(key: str, value: str, country: str | None, phone_region: str | None) -> str | None:
    text = value.strip().lower()
    if is_sha256_hex(text):
        return text
    normal = normalize(key, text, country=country, phone_region=phone_region)
    return None if normal is None else sha256_hex(normal)


US_STATES = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "districtofcolumbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi", "minnesota": "mn",
    "mississippi": "ms", "missouri": "mo", "montana": "mt", "nebraska": "ne", "nevada": "nv",
    "newhampshire": "nh", "newjersey": "nj", "newmexico": "nm", "newyork": "ny",
    "northcarolina": "nc", "northdakota": "nd", "ohio": "oh", "oklahoma": "ok", "oregon": "or",
    "pennsylvania": "pa", "rhodeisland": "ri", "southcarolina": "sc", "southdakota": "sd",
    "tennessee": "tn", "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va",
    "washington": "wa", "westvirginia": "wv", "wisconsin": "wi", "wyoming": "wy",
    "americansamoa": "as", "guam": "gu", "northernmarianaislands": "mp", "puertorico": "pr",
    "unitedstatesvirginislands": "vi", "virginislands": "vi",
}  # fmt: skip
