"""Parsers for the string forms callers send: ISO 8601 times and lists of content ids."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

# One item of `'A', "B", C`: a quoted id (may hold commas and backslash escapes), a bare id, or
# nothing (an empty entry), then a comma or the end. `\s*+` and the bare form's greedy body keep
# matching linear in the input length.
_ITEM = re.compile(
    r"""\s*+(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|([^,'"\s](?:[^,]*[^,\s])?))?\s*(?:,|\Z)"""
)
_ESCAPE = re.compile(r"\\(.)")


def parse_event_time(value: str) -> int:
    """Unix seconds from an ISO 8601 timestamp (`Z`, offsets, fractions; no zone means UTC).

    Raises ValueError.
    """
    parsed = datetime.fromisoformat(value.strip())
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def parse_content_ids(value: str) -> list[str]:
    """Content ids from one id, a comma-separated list, a JSON array, or `"['A', 'B']"`.

    The Python-literal form from the published example is parsed as text, never evaluated.
    Raises ValueError on an unbalanced or malformed list. Empty ids are dropped.
    """
    text = value.strip()
    if not text:
        return []
    if text.startswith("[") != text.endswith("]"):
        raise ValueError("has an unbalanced '[' or ']'")
    if not text.startswith("["):
        return [s for s in (part.strip() for part in text.split(",")) if s]
    if '"' not in text and "'" in text:
        items: object = _split_quoted(text[1:-1])  # the published form; no JSON attempt
    else:
        try:
            items = json.loads(text)
        except RecursionError:
            raise ValueError("nests lists too deeply") from None
        except ValueError:
            items = _split_quoted(text[1:-1])
    if not isinstance(items, list) or not all(
        isinstance(i, str | int) and not isinstance(i, bool) for i in items
    ):
        raise ValueError("must be a list of ids (strings or numbers)")
    return [s for s in (str(i).strip() for i in items) if s]


def _split_quoted(inner: str) -> list[str]:
    """Split `'A', "B", C` into ids; quotes may hold commas; empty entries give ""."""
    simple = [part.strip() for part in inner.split(",")]
    if all(
        len(p) >= 2 and p[0] == p[-1] == "'" and "'" not in p[1:-1] and "\\" not in p
        for p in simple
    ):
        return [p[1:-1] for p in simple]  # the published form, 'A', 'B': nothing to unescape
    items: list[str] = []
    pos = 0
    inner = inner.strip()
    while pos < len(inner):
        match = _ITEM.match(inner, pos)
        if match is None or match.end() == pos:
            raise ValueError("is not a list of quoted ids such as ['ABC123', 'XYZ789']")
        single, double, bare = match.groups()
        quoted = single if single is not None else double
        items.append(_ESCAPE.sub(r"\1", quoted) if quoted is not None else bare or "")
        pos = match.end()
    return items
