"""Bounds on every parameter, applied to each tool's schema before any other check runs.

The published ActionKit schemas set no lengths, so the catalog adds them here: a string is
refused by its `maxLength` before a pattern, a parser or a hash ever sees it. Per field where a
standard or Meta sets one, a generous default elsewhere. The README's "Limits" table mirrors it.
"""

from __future__ import annotations

import copy
from typing import Any

# RFC 5321 §4.5.3.1: a path (an address) is at most 256 octets with its angle brackets.
EMAIL = 254
URL = 4096
DEFAULT_STRING = 1024
# Any string, wherever it is (free-form values included): the longest a known field takes.
MAX_ANY_STRING = 16384
# Longest lengths by parameter name, camelCase and CAPI's snake_case alike. A hashed key takes
# at least 64, room for a value already hashed (64-hex SHA-256), which passes through.
STRING_LIMITS = {
    **dict.fromkeys(("customerEmail", "em"), EMAIL),
    **dict.fromkeys(("customerPhone", "ph"), 64),
    **dict.fromkeys(("customerFirstName", "customerLastName", "fn", "ln"), 256),
    **dict.fromkeys(("customerCity", "ct", "customerState", "st"), 256),
    **dict.fromkeys(("customerCountryCode", "country"), 64),
    **dict.fromkeys(("customerZip", "zp"), 64),
    **dict.fromkeys(("customerGender", "ge"), 64),
    **dict.fromkeys(("customerDateOfBirth", "db"), 64),
    **dict.fromkeys(("customerExternalId", "external_id"), 512),
    **dict.fromkeys(("customerClientIpAddress", "client_ip_address"), 64),
    **dict.fromkeys(("customerClientUserAgent", "client_user_agent"), 2048),
    **dict.fromkeys(("eventSourceUrl", "event_source_url", "referrer_url"), URL),
    **dict.fromkeys(("eventTime",), 64),
    **dict.fromkeys(("pixel", "pixel_id"), 32),
    # A list of ids in one string: room for a cart of a few hundred ids.
    "contentId": MAX_ANY_STRING,
}
# Arrays without a bound of their own: Meta takes at most 1,000 events, and lists in an event
# (contents, content_ids) are far shorter in practice.
MAX_ITEMS = 1000
# Free-form objects (custom_data's extra keys, app_data): keys at most.
MAX_PROPERTIES = 100
# Any integer, wherever it is (free-form values included): what the JSON body sent to Graph
# (orjson) can carry, a signed or an unsigned 64-bit integer.
MIN_ANY_INTEGER, MAX_ANY_INTEGER = -(2**63), 2**64 - 1
# Numbers of known fields: integers beyond 2**53 lose precision in JSON (RFC 7493 §2.2), and no
# amount, count or time Meta takes comes near it.
MAX_INTEGER = 2**53 - 1
# Nesting of the parameters object, counted from it: the schemas need 5 (events[].custom_data.
# contents[].x); free-form parts may nest a little more, never deep enough to endanger a parser.
MAX_DEPTH = 16


# The definition (`$defs`) of a free-form value, recursive: extra keys of custom_data and of
# contents[] items, app_data. A chain of one definition per depth would state MAX_DEPTH too, but
# tools that walk a schema's branches (schemathesis' coverage phase) take exponential time on it;
# the server checks the nesting (server/validation.py `shape_violation`) and the text says so.
ANY_JSON = "AnyBoundedJson"
ANY_JSON_SCHEMA: dict[str, Any] = {
    "description": (
        f"Any JSON value within the bounds of every value: strings at most {MAX_ANY_STRING} "
        f"characters, arrays at most {MAX_ITEMS} items, objects at most {MAX_PROPERTIES} keys, "
        "numbers within 64 bits, and nested at most "
        f"{MAX_DEPTH} levels deep counted from `parameters` (checked by the server)."
    ),
    "type": ["null", "boolean", "number", "string", "array", "object"],
    "maxLength": MAX_ANY_STRING,
    # Not MIN_ANY_INTEGER itself: a JSON integer just below it reaches the server as the float
    # it rounds to (orjson parses integers beyond 64 bits as floats), -2**63 exactly.
    "minimum": MIN_ANY_INTEGER + 1,
    "maximum": MAX_ANY_INTEGER,
    "maxItems": MAX_ITEMS,
    "items": {"$ref": f"#/$defs/{ANY_JSON}"},
    "maxProperties": MAX_PROPERTIES,
    "additionalProperties": {"$ref": f"#/$defs/{ANY_JSON}"},
}


def bounded(schema: Any) -> Any:
    """A copy of a tool's parameters schema with a length, count or range on every string,
    array, object and number that has none. A free-form value (an extra key of an object whose
    `additionalProperties` is not false) is an AnyBoundedJson, defined in the schema's `$defs`."""
    out: dict[str, Any] = _bounded(schema, "")
    out["$defs"] = {ANY_JSON: copy.deepcopy(ANY_JSON_SCHEMA)}
    return out


def _bounded(node: Any, name: str) -> Any:
    """`node` bounded; `name` is the property it describes."""
    if isinstance(node, list):
        return [_bounded(item, name) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {prop: _bounded(schema, prop) for prop, schema in value.items()}
        elif key in ("items", "oneOf", "anyOf", "allOf", "additionalProperties"):
            out[key] = _bounded(value, name)
        else:
            out[key] = value
    types = node.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if "string" in types:
        out.setdefault("maxLength", STRING_LIMITS.get(name, DEFAULT_STRING))
    if "array" in types:
        out.setdefault("maxItems", MAX_ITEMS)
    if types & {"integer", "number"}:
        out.setdefault("maximum", MAX_INTEGER)
        out.setdefault("minimum", -MAX_INTEGER)
    if "object" in types and out.get("additionalProperties", True) is not False:
        out.setdefault("maxProperties", MAX_PROPERTIES)
        if out.get("additionalProperties", True) is True:
            out["additionalProperties"] = {"$ref": f"#/$defs/{ANY_JSON}"}
    return out
