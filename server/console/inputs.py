"""What the console's pages take from a request, each value checked against a pattern and a
length, so a bad one is a 400 page that names the field (never its value), never a 500.

Forms are `application/x-www-form-urlencoded` (what an HTML form sends), at most
MAX_FORM_BYTES, read before they are parsed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qs

from starlette.requests import Request

MAX_FORM_BYTES = 16 * 1024
MAX_FIELDS = 300
Values = Mapping[str, Sequence[str]]  # a field's values, in the order sent

# What the tools accept: an event_id is any text up to 1,024 characters (tools/limits.py), a
# pixel 1 to 32 digits (tools/capi.py); control characters never.
EVENT_ID = re.compile(r"[^\x00-\x1f\x7f]{1,1024}")
PIXEL = re.compile(r"[0-9]{1,32}")
PROJECT = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
CODE = re.compile(r"[A-Z][A-Z_]{0,63}")
SEQ = re.compile(r"[1-9][0-9]{0,17}")


class BadInput(Exception):
    """A value the page cannot use; the message names the field, never the value."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


async def read_form(request: Request) -> Values:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise BadInput("Send the form as an HTML form does (application/x-www-form-urlencoded).")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise BadInput("The form is too large.", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise BadInput("The form is too large.", 413)
    try:
        return parse_qs(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        raise BadInput("The form is not valid URL-encoded UTF-8 text.") from None


def query(request: Request) -> Values:
    """The query string's fields (bounded like a form's)."""
    try:
        return parse_qs(
            request.url.query, keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict"
        )
    except ValueError:  # too many fields, or not UTF-8
        raise BadInput("The query string is not valid here.") from None


def text(
    values: Values, name: str, pattern: re.Pattern[str], *, required: bool = False
) -> str | None:
    """One field's value (None when absent or empty, unless `required`)."""
    given = values.get(name, ())
    if len(given) > 1:
        raise BadInput(f"Give {name} once.")
    value = given[0].strip() if given else ""
    if not value:
        if required:
            raise BadInput(f"{name} is required.")
        return None
    if not pattern.fullmatch(value):
        raise BadInput(f"{name} is not valid here.")
    return value


def choice(values: Values, name: str, choices: Sequence[str], default: str) -> str:
    value = text(values, name, re.compile(r"[\x21-\x7e]{1,64}")) or default
    if value not in choices:
        raise BadInput(f"{name} must be one of {', '.join(choices)}.")
    return value


def number(values: Values, name: str, *, low: int, high: int, default: int) -> int:
    value = text(values, name, re.compile(r"[0-9]{1,9}"))
    if value is None:
        return default
    if not low <= int(value) <= high:
        raise BadInput(f"{name} must be a whole number from {low} to {high}.")
    return int(value)


def seqs(values: Values, name: str, *, most: int) -> list[int]:
    """Row numbers (checkboxes, or repeated in a query), each once, in the order given."""
    given = values.get(name, ())
    if len(given) > most:
        raise BadInput(f"Choose at most {most} events at once.")
    if not all(SEQ.fullmatch(value) for value in given):
        raise BadInput(f"{name} is not valid here.")
    return list(dict.fromkeys(int(value) for value in given))


def next_path(value: str | None) -> str:
    """Where a login goes on: a console path only (never another site: no open redirect)."""
    if (
        value is None
        or len(value) > 512
        or not (value == "/console" or value.startswith("/console/"))
        or "//" in value
        or "\\" in value
        or not value.isprintable()
    ):
        return "/console"
    return value
