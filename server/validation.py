"""Schema validation of tool parameters, reporting every violation by path.

Valid parameters (the common case) are confirmed by jsonschema-rs, compiled once (~1 µs
against ~100 µs); only when it says no does `jsonschema`, the reference, walk the parameters
to name every violation. The reference has the last word, and a test runs both on a corpus
to show they agree. Messages are written here rather than taken from jsonschema, whose text
quotes the offending value (a customer's email, say): an error must never echo customer data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator, ValidationError

from server.errors import InvalidParameters
from tools.base import Violation


class ParameterValidator:
    def __init__(self, tool_name: str, schema: Mapping[str, Any]) -> None:
        self._tool_name = tool_name
        self._validator = Draft202012Validator(schema)
        self._fast = jsonschema_rs.Draft202012Validator(dict(schema))

    def check(self, parameters: Any) -> None:
        """Raise InvalidParameters listing every violation, or return for valid parameters."""
        if self._fast.is_valid(parameters):
            return
        violations = {
            v for error in self._validator.iter_errors(parameters) for v in self._explain(error)
        }
        if violations:
            raise InvalidParameters(sorted(violations, key=lambda v: v.path))

    def _explain(self, error: ValidationError) -> list[Violation]:
        path = "parameters" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
        )
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
            "minItems": lambda: f"must have at least {expected} item(s)",
            "maxItems": lambda: f"must have at most {expected} items",
            "minimum": lambda: f"must be at least {expected}",
            "oneOf": lambda: "must be a string or a list of strings",
        }
        explain = messages.get(str(kind))
        return [Violation(path, explain() if explain else f"does not satisfy '{kind}'")]
