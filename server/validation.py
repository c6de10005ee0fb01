"""Schema validation of tool parameters, reporting violations by path.

Valid parameters (the common case) are confirmed by jsonschema-rs, compiled once (~1 µs
against ~100 µs); only when it says no does `jsonschema`, the reference, walk the parameters
to name the violations. Both read `pattern` as ECMA-262 does (JSON Schema 2020-12 §6.4), so
`$` ends the string: Python's own `$` would also match before a final newline. Where they
still disagree the stricter one wins, and a test runs both over every pattern and a corpus.
Messages are written here rather than taken from jsonschema, whose text quotes the
offending value (a customer's email, say): an error must never echo customer data.

Before either runs, every value's nesting and length is checked (tools/limits.py), and at most
MAX_VIOLATIONS are listed, so a large invalid body costs a bounded amount of work.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from itertools import islice
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator, ValidationError, validators

from server.errors import MAX_VIOLATIONS, InvalidParameters
from tools.base import Violation
from tools.limits import (
    MAX_ANY_INTEGER,
    MAX_ANY_STRING,
    MAX_DEPTH,
    MAX_ITEMS,
    MIN_ANY_INTEGER,
)


@lru_cache(maxsize=256)
def ecma_pattern(pattern: str) -> re.Pattern[str]:
    """`pattern` compiled so that `$` outside a class matches only at the very end."""
    out: list[str] = []
    in_class = escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char == "$" and not in_class:
            out.append(r"\Z")
            continue
        out.append(char)
    return re.compile("".join(out))


def _ecma_pattern_check(
    validator: Any, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if isinstance(instance, str) and not ecma_pattern(pattern).search(instance):
        yield ValidationError(f"does not match {pattern!r}")


_Reference = validators.extend(  # type: ignore[no-untyped-call]  # jsonschema is untyped here
    Draft202012Validator, {"pattern": _ecma_pattern_check}
)


def shape_violation(parameters: Any) -> Violation | None:
    """The first value, by path, that breaks the bounds every value keeps whatever its schema
    says, free-form ones included (tools/limits.py): nesting, string and list length, and
    integers Graph's JSON body can carry (the MCP SDK keeps integers of any size)."""
    if _within_bounds(parameters):  # the usual case: no paths built
        return None
    stack: list[tuple[Any, int, str]] = [(parameters, 0, "parameters")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if len(node) > MAX_ANY_STRING:
                return Violation(path, f"must be at most {MAX_ANY_STRING} characters")
            continue
        if type(node) is int and not MIN_ANY_INTEGER <= node <= MAX_ANY_INTEGER:
            return Violation(path, "is out of range (at most 64 bits)")
        if not isinstance(node, dict | list):
            continue
        if depth >= MAX_DEPTH:
            return Violation(path, f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, list) and len(node) > MAX_ITEMS:
            return Violation(path, f"must have at most {MAX_ITEMS} items")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            child = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"
            stack.append((value, depth + 1, child))
    return None


def _within_bounds(root: Any) -> bool:
    # On every call's hot path: exact type checks and no generators (JSON gives dict and list).
    stack = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        kind = type(node)
        if kind is dict:
            values = node.values()
        elif kind is list:
            if len(node) > MAX_ITEMS:
                return False
            values = node
        else:
            continue
        if depth >= MAX_DEPTH:
            return False
        for value in values:
            kind = type(value)
            if kind is dict or kind is list:
                stack.append((value, depth + 1))
            elif kind is str:
                if len(value) > MAX_ANY_STRING:
                    return False
            elif kind is int and not MIN_ANY_INTEGER <= value <= MAX_ANY_INTEGER:
                return False
    return True


class ParameterValidator:
    def __init__(self, tool_name: str, schema: Mapping[str, Any]) -> None:
        self._tool_name = tool_name
        self._validator = _Reference(schema)
        self._fast = jsonschema_rs.Draft202012Validator(dict(schema))

    def check(self, parameters: Any) -> None:
        """Raise InvalidParameters listing the violations, or return for valid parameters."""
        if (out_of_bounds := shape_violation(parameters)) is not None:
            raise InvalidParameters([out_of_bounds])
        if self._fast.is_valid(parameters):
            return
        violations: set[Violation] = set()
        more = False
        for error in self._validator.iter_errors(parameters):
            if len(violations) >= MAX_VIOLATIONS:
                more = True
                break
            violations.update(self._explain(error))
        if not violations:  # only the fast validator objects: it is the stricter, so it wins
            errors = islice(self._fast.iter_errors(parameters), MAX_VIOLATIONS + 1)
            violations = {
                Violation(_path(error.instance_path), "does not satisfy the schema")
                for error in errors
            }
        raise InvalidParameters(sorted(violations, key=lambda v: v.path), more=more)

    def _explain(self, error: ValidationError) -> list[Violation]:
        path = _path(error.absolute_path)
        kind = error.validator
        expected: Any = error.validator_value
        instance: Any = error.instance
        if kind == "required":
            present = instance if isinstance(instance, dict) else {}
            return [
                Violation(f"{path}.{name}", "is required")
                for name in expected
                if name not in present
            ]
        if kind == "additionalProperties":
            schema: Any = error.schema
            known = schema.get("properties", {})
            what = f"a parameter of {self._tool_name}" if path == "parameters" else "a known field"
            return [
                Violation(f"{path}.{name}", f"is not {what}")
                for name in instance
                if name not in known
            ]
        types = " or ".join(map(str, expected)) if isinstance(expected, list) else str(expected)
        messages: dict[str, Callable[[], str]] = {
            "type": lambda: f"must be of type {types}",
            "enum": lambda: f"must be one of: {', '.join(map(str, expected))}",
            "pattern": lambda: f"must match the pattern {expected}",
            "minLength": lambda: (
                "must not be empty" if expected == 1 else f"must be at least {expected} characters"
            ),
            "maxLength": lambda: f"must be at most {expected} characters",
            "maxProperties": lambda: f"must have at most {expected} keys",
            "maximum": lambda: f"must be at most {expected}",
            "minItems": lambda: f"must have at least {expected} item(s)",
            "maxItems": lambda: f"must have at most {expected} items",
            "minimum": lambda: f"must be at least {expected}",
            "oneOf": lambda: "must be a string or a list of strings",
        }
        explain = messages.get(str(kind))
        return [Violation(path, explain() if explain else f"does not satisfy '{kind}'")]


def _path(parts: Any) -> str:
    return "parameters" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
