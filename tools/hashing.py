"""Normalise and SHA-256 hash customer information, per Meta's rules.

Rules: https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters
Every input the official SDK (`facebook_business...serverside.normalize.Normalize`) accepts
hashes to the SDK's value, except where Meta's rule goes further than the SDK; each such case
is named below and pinned by a test (tests/test_hashing.py) on both sides:
- fn, ln: punctuation is removed (the SDK keeps apostrophes, hyphens, commas, ...).
- ct, st: only letters and combining marks are kept (the SDK removes just ASCII digits, `.`,
  whitespace, `-`, `(` and `)`, so it keeps apostrophes, commas, `&`, ...).
- fn, ln, ct, st: Unicode NFC first, so a decomposed accent (`e` + U+0301) hashes like the
  composed one of Meta's examples ("Valéry"); the SDK hashes the code points as given.
- st: US state names become their two-letter code; country: names, alpha-3 codes and `UK`
  become alpha-2.
- zp: a US ZIP+4 keeps its first five digits (the SDK cuts at any `-`; we also cut
  `123456789`). Without a country only `NNNNN-NNNN` counts as a ZIP+4; other dashed
  postcodes (`00-950`, `100-0001`) and, with a non-US country, every postcode lose the dash
  and keep their digits.
- ph: E.164 digits via phonenumbers: an extension is dropped, a trunk `0` after the country
  code is dropped (`+44 (0)20 ...`; Italy's leading 0 is part of the number and stays),
  non-ASCII digits become ASCII, and a number without a country code is placed with a
  region (below). The SDK only removes spaces, `-`, `(`, `)`, a `+` and leading zeros: it
  keeps the trunk zero (`4402079460958`), rejects a written extension, never adds a
  country code, and hashes a national number as it is (`6505551212`, which Meta cannot
  match).
- db: becomes YYYYMMDD from the forms Meta's page allows ("YYYYMMDD ... with or without
  punctuation", its example `2/16/1997`); it must be a real date from 1900 on and not in the
  future. ge: `f`, `m`, `female` or `male` becomes `f` or `m`. The SDK's `normalize_field`
  hashes both as given (its `UserData` takes gender as an enum and leaves dates to the caller).
- external_id: hashed as Meta recommends (the SDK's `UserData` sends it raw).
- a 32-hex MD5 is not treated as already hashed: Meta asks for SHA-256.
- a value that normalises to nothing gives None, never the hash of "" (the SDK hashes
  an empty or whitespace-only fn, ln, ct, st, zp, ...).
- every key has a maximum length (`MAX_CHARS`: e-mail 254 as RFC 5321 allows, names and
  places 256, ...), checked before any other work; the SDK has none. The e-mail check
  accepts exactly what the SDK's pattern accepts, in linear time (see `_email`).

Choices where Meta's page does not decide (also in the README):
- ph without `+`/`00`, with a region R (the customer's country, else the project's
  default_phone_region): (1) if the digits begin with R's country code and the rest is a
  valid number of R, they already carry it; (2) else a valid national number of R gets R's
  country code; (3) else digits valid as an international number are kept as they are;
  (4) else a number of a length possible in R gets R's code; (5) else it is refused. Without
  a region only (3) applies, and a number that fails it is dropped with a warning: Meta
  needs the country code and guessing one would hash a number it cannot match.
  With `+` or `00` (or R's own exit code, `011` in the US), the number must have a length
  possible for its country code.
  Numbers shorter than a full number (`555-1212`, missing its area code) are refused,
  never given a prefix.
- db: year-first forms (`1997-2-16`, `1997 02 16`, `1997/02/16`, `19970216`) and year-last
  forms read as Meta's example reads them, month first (`2/16/1997`); a year-last date
  that is only valid day-first (`16/02/1997`) is refused rather than guessed, two-digit
  years are refused. "In the future" means after today in every time zone (UTC + 1 day).
- Warnings (`notes`) are given only where a value is dropped or its meaning changed: a key
  not sent (no country code for a phone, nothing left after normalising), a phone's
  extension dropped, a country code added to a phone, a ZIP+4 cut to five digits. Case,
  spaces, punctuation, accents' encoding, state and country names are Meta's normal form
  and give none.
Pure functions: no I/O; the clock only when `today` is not given for a date of birth.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

import phonenumbers
import pycountry

# Keys whose values Meta expects SHA-256 hashed.
HASHED_KEYS = frozenset(
    {"em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id"}
)
# The longest raw value (surrounding spaces included) each key takes, checked before any other
# work: e-mail, RFC 5321's 254; names and places, longer than any real one (Bangkok's full
# name is 168 letters); phone, any number written with an extension; country, any name
# pycountry knows (52); external ids, generous for cookie or CRM ids. A 64-hex SHA-256 fits all.
MAX_CHARS = {
    "em": 254, "fn": 256, "ln": 256, "ct": 256, "st": 256, "ph": 64, "zp": 64, "db": 64,
    "ge": 64, "country": 64, "external_id": 1024,
}  # fmt: skip
# Only values this short are remembered by the caches below, so a cache holds at most
# maxsize x 64 characters, whatever callers send.
CACHED_VALUE_MAX_CHARS = 64

_SHA256 = re.compile(r"[0-9a-f]{64}")  # only after a length check: linear, and at most 64
_GENDERS = {"f": "f", "m": "m", "female": "f", "male": "m"}
# Common names pycountry does not know (it has "Türkiye", "Russian Federation", ...).
_COUNTRY_ALIASES = {
    "uk": "gb", "greatbritain": "gb", "england": "gb", "scotland": "gb", "wales": "gb",
    "northernireland": "gb", "russia": "ru", "turkey": "tr", "ivorycoast": "ci",
    "holland": "nl", "macedonia": "mk", "vatican": "va", "palestine": "ps",
}  # fmt: skip
# Names and places: composed and decomposed accents must hash alike (Meta's examples are NFC).
_NFC_KEYS = frozenset({"fn", "ln", "ct", "st"})

Notes = list[str]


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
# Date separators Meta's "with or without punctuation" covers, all made one space.
_DATE_SEPARATORS = str.maketrans("-/.", "   ")


def _nfc(value: str) -> str:
    return value if value.isascii() else unicodedata.normalize("NFC", value)


def _letters(value: str) -> str:
    """Letters and combining marks only: Meta's 'no spaces, no punctuation'.

    Digits go too, as in the SDK; marks stay (Indic vowel signs), as in the SDK. Beyond the
    SDK: apostrophes, commas and other symbols go too.
    """
    if value.isascii():
        return value.translate(_ASCII_DROP_NON_LETTERS)
    return "".join(c for c in value if unicodedata.category(c)[0] in "LM")


def _ascii_digits(value: str) -> str:
    """Decimal digits of any script as ASCII digits; other characters unchanged (beyond the SDK)."""
    if value.isascii():
        return value
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in value)


def _without_punctuation(value: str) -> str:
    if value.isascii():
        return value.translate(_ASCII_DROP_PUNCTUATION)
    return "".join(c for c in value if not unicodedata.category(c).startswith("P"))


def _is_ascii_digits(value: str) -> bool:
    return value.isascii() and value.isdigit()


def country_code(value: str) -> str:
    """ISO 3166-1 alpha-2, lowercase, from a code, alpha-3 code or English name, any case.

    Beyond the SDK (which takes alpha-2 only): alpha-3 codes, names and `UK` are mapped.
    """
    if len(value) <= CACHED_VALUE_MAX_CHARS:
        return _country_code_cached(value)
    return _country_code(value)


def _country_code(value: str) -> str:
    _check_length("country", value)
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


_country_code_cached = lru_cache(maxsize=1024)(_country_code)


def phone_region(*candidates: str | None) -> str | None:
    """The first candidate (ISO alpha-2, any case) phonenumbers has numbering data for."""
    for candidate in candidates:
        if candidate and (region := candidate.upper()) in phonenumbers.SUPPORTED_REGIONS:
            return region
    return None


def _state(value: str, country: str | None) -> str:
    letters = _letters(value)
    if country in (None, "us"):
        return US_STATES.get(letters, letters)  # beyond the SDK: state names become codes
    return letters


_ZIP4_CUT = "is a US ZIP+4 code: only its first five digits are sent (Meta's rule)"


def _is_zip4(text: str) -> bool:
    return len(text) == 10 and text[5] == "-" and _is_ascii_digits(text[:5] + text[6:])


def _zip(value: str, country: str | None, notes: Notes | None) -> str:
    compact = "".join(value.split())
    if country not in (None, "us"):
        return compact.replace("-", "")  # "no dash": Poland's 00-950 must not become 00
    if country == "us":
        head, _, tail = compact.partition("-")  # as the SDK cuts
    elif _is_zip4(compact):
        head, tail = compact[:5], compact[6:]  # no country: only NNNNN-NNNN is a ZIP+4
    elif "-" in compact:
        return compact.replace("-", "")  # Japan's 100-0001, Brazil's 01310-100: digits kept
    else:
        head, tail = compact, ""
    if not tail and len(head) == 9 and _is_ascii_digits(head):  # ZIP+4 without its dash
        head, tail = head[:5], head[5:]
    if tail and notes is not None:
        notes.append(_ZIP4_CUT)
    return head


def _date_of_birth(value: str, today: date | None) -> str:
    """YYYYMMDD of a real date from 1900 to today, from a year-first date (with or without
    `-`, `/`, `.` or spaces, one- or two-digit month and day) or a month-first one ending with
    the year (Meta's example `2/16/1997`). Beyond the SDK, which hashes db as given."""
    parts = _ascii_digits(value).translate(_DATE_SEPARATORS).split()
    if not all(_is_ascii_digits(p) for p in parts):
        raise NormalizationError("must be a date such as YYYYMMDD, YYYY-MM-DD or MM/DD/YYYY")
    if len(parts) == 1 and len(parts[0]) == 8:
        year, month, day = parts[0][:4], parts[0][4:6], parts[0][6:]
    elif len(parts) == 3 and len(parts[0]) == 4 and max(map(len, parts[1:])) <= 2:
        year, month, day = parts
    elif len(parts) == 3 and len(parts[2]) == 4 and max(map(len, parts[:2])) <= 2:
        month, day, year = parts  # year last: month first, as in Meta's example
    else:
        raise NormalizationError("must be a date such as YYYYMMDD, YYYY-MM-DD or MM/DD/YYYY")
    try:
        born = date(int(year), int(month), int(day))
    except ValueError:
        message = "is not a real calendar date"
        if len(parts) == 3 and len(parts[2]) == 4:
            message += " (a date ending with the year is read month first, MM/DD/YYYY)"
        raise NormalizationError(message) from None
    if born.year < 1900:
        raise NormalizationError("must be a date from 1900 on")
    latest = (today or datetime.now(UTC).date()) + timedelta(days=1)  # ahead of UTC: +14 h
    if born > latest:
        raise NormalizationError("is in the future")
    return born.strftime("%Y%m%d")


def _gender(value: str) -> str:
    """f or m, from f, m, female or male (beyond the SDK, which hashes ge as given)."""
    gender = _GENDERS.get(value)
    if gender is None:
        raise NormalizationError("must be f, m, female or male")
    return gender


_PHONE_NO_REGION = (
    "has no country code and no country is known for it (send +<country code>, the "
    "customer's country, or set the project's default_phone_region): not sent"
)
_PHONE_CODE_ADDED = (
    "has no country code: the code of the customer's country (else of the project's "
    "default_phone_region) was added"
)
_PHONE_EXTENSION = "has an extension: it was dropped, Meta matches the number without it"


def _phone(value: str, region: str | None, notes: Notes | None) -> str | None:
    """E.164 digits (no `+`) of a phone number, or None when it has no country code and no
    region is known. The rule for numbers without `+` is in the module docstring."""
    text = _ascii_digits(value)
    if text.startswith("00"):
        text = "+" + text[2:]  # "remove any double 0 in front of the country code"
    if text.startswith("+"):
        number = _parse_phone(text, None)
        if number is None or not _possible(number):
            raise NormalizationError("is not a phone number of a possible length for its country")
        return _e164(number, notes)
    region = phone_region(region)
    if region is None:
        number = _parse_phone("+" + text, None)
        if number is not None and phonenumbers.is_valid_number(number):
            return _e164(number, notes)
        if not 7 <= sum(c.isdigit() for c in text) <= 15:
            raise NormalizationError("must be a phone number with its country code")
        if notes is not None:
            notes.append(_PHONE_NO_REGION)
        return None
    code = str(phonenumbers.country_code_for_region(region))
    international = None
    if "".join(filter(str.isdigit, text)).startswith(code):
        international = _parse_phone("+" + text, None)
        if (
            international is not None
            and str(international.country_code) == code
            and phonenumbers.is_valid_number(international)
        ):
            return _e164(international, notes)  # (1) the digits already carry R's code
    national = _parse_phone(text, region)
    if national is not None and phonenumbers.is_valid_number(national):  # (2)
        return _e164(national, notes, added_code=_code_was_added(national))
    if international is None:
        international = _parse_phone("+" + text, None)
    if international is not None and phonenumbers.is_valid_number(international):  # (3)
        return _e164(international, notes)
    if national is not None and _possible(national):  # (4)
        return _e164(national, notes, added_code=_code_was_added(national))
    raise NormalizationError(
        "is not a valid phone number for the customer's country or the project's "
        "default_phone_region, nor a number with its country code"
    )


def _parse_phone(text: str, region: str | None) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse(text, region, keep_raw_input=region is not None)
    except phonenumbers.NumberParseException:
        return None


def _possible(number: phonenumbers.PhoneNumber) -> bool:
    """A full number's length for its country (a local-only length lacks its area code)."""
    reason = phonenumbers.is_possible_number_with_reason(number)
    return bool(reason == phonenumbers.ValidationResult.IS_POSSIBLE)


def _code_was_added(number: phonenumbers.PhoneNumber) -> bool:
    return bool(number.country_code_source == phonenumbers.CountryCodeSource.FROM_DEFAULT_COUNTRY)


def _e164(
    number: phonenumbers.PhoneNumber, notes: Notes | None, *, added_code: bool = False
) -> str:
    if notes is not None:
        if number.extension:
            notes.append(_PHONE_EXTENSION)
        if added_code:
            notes.append(_PHONE_CODE_ADDED)
    return f"{number.country_code}{phonenumbers.national_significant_number(number)}"


def _email(text: str) -> str:
    """The SDK's check, `re.match(r".+@.+\\..+", text)`, in one linear pass: within the first
    line (`.` does not match a newline) an `@` after at least one character, then a `.` after
    at least one more, then at least one character. The SDK's pattern backtracks
    quadratically or worse on inputs such as a long run of `@`."""
    end = text.find("\n")
    if end == -1:
        end = len(text)
    at = text.find("@", 1, end)  # the leftmost @ leaves the most room for the rest
    if at == -1 or text.find(".", at + 2, end - 1) == -1:
        raise NormalizationError("is not an email address")
    return text


def _name(text: str) -> str:
    return _without_punctuation(text).strip()  # beyond the SDK: punctuation goes


# Per key: (lowercased, stripped text, normalised country, phone region, today, notes) -> normal
# form, or None / "" when nothing is to be sent.
Rule = Callable[[str, str | None, str | None, date | None, Notes | None], str | None]
_RULES: dict[str, Rule] = {
    "em": lambda text, _c, _r, _t, _n: _email(text),
    "fn": lambda text, _c, _r, _t, _n: _name(text),
    "ln": lambda text, _c, _r, _t, _n: _name(text),
    "ct": lambda text, _c, _r, _t, _n: _letters(text),
    "st": lambda text, country, _r, _t, _n: _state(text, country),
    "zp": lambda text, country, _r, _t, notes: _zip(text, country, notes),
    "country": lambda text, _c, _r, _t, _n: country_code(text),
    "db": lambda text, _c, _r, today, _n: _date_of_birth(text, today),
    "ge": lambda text, _c, _r, _t, _n: _gender(text),
    "ph": lambda text, _c, region, _t, notes: _phone(text, region, notes),
}


def _check_length(key: str, value: str) -> None:
    if len(value) > (most := MAX_CHARS.get(key, 1024)):
        raise NormalizationError(f"is longer than {most} characters")


def _clean(key: str, value: str) -> str:
    _check_length(key, value)
    text = value.strip().lower()
    if key in _NFC_KEYS and not text.isascii():
        return unicodedata.normalize("NFC", text)
    return text


def _normal(
    key: str,
    text: str,
    country: str | None,
    region: str | None,
    *,
    today: date | None,
    notes: Notes | None,
) -> str | None:
    if not text:
        return None
    rule = _RULES.get(key)
    return (rule(text, country, region, today, notes) if rule else text) or None


def normalize(
    key: str,
    value: str,
    *,
    country: str | None = None,
    phone_region: str | None = None,
    today: date | None = None,
    notes: Notes | None = None,
) -> str | None:
    """Meta's normal form of one raw value, or None when nothing is to be sent.

    `country` (already normalised) steers the US-only rules for `st` and `zp`;
    `phone_region` (ISO alpha-2) places phone numbers written without a country code;
    `today` bounds a date of birth (default: today in UTC). What was dropped or changed in
    meaning is appended to `notes` (messages naming no value). Does not hash and does not
    detect already-hashed input: see `hash_value`.
    """
    return _normal(key, _clean(key, value), country, phone_region, today=today, notes=notes)


# Keys whose values repeat across customers (a few hundred countries and states, the
# same cities): their hashes are remembered, bounded. Emails, phones, names and ids are not.
# None of their rules writes notes.
_REPEATING_KEYS = frozenset({"country", "st", "ct", "ge"})


def hash_value(
    key: str,
    value: str,
    *,
    country: str | None = None,
    phone_region: str | None = None,
    today: date | None = None,
    notes: Notes | None = None,
) -> str | None:
    """SHA-256 hex of the normalised value; a value already 64-hex passes through (lowercased).

    A 32-hex MD5 is hashed like any other value (the SDK passes it through). Arguments as
    for `normalize`.
    """
    if key in _REPEATING_KEYS:
        if len(value) <= CACHED_VALUE_MAX_CHARS:
            return _hash_repeating(key, value, country)
        return _hash(key, value, country, None, today=None, notes=None)
    return _hash(key, value, country, phone_region, today=today, notes=notes)


@lru_cache(maxsize=4096)
def _hash_repeating(key: str, value: str, country: str | None) -> str | None:
    return _hash(key, value, country, None, today=None, notes=None)


def _hash(
    key: str,
    value: str,
    country: str | None,
    region: str | None,
    *,
    today: date | None,
    notes: Notes | None,
) -> str | None:
    # `_clean` and `_normal` inlined: this runs for every customer value of every event.
    if len(value) > MAX_CHARS.get(key, 1024):
        _check_length(key, value)  # raises
    text = value.strip().lower()
    if key in _NFC_KEYS and not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if len(text) == 64 and _SHA256.fullmatch(text):
        return text
    if not text:
        return None
    rule = _RULES.get(key)
    normal = rule(text, country, region, today, notes) if rule else text
    return hashlib.sha256(normal.encode()).hexdigest() if normal else None


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
