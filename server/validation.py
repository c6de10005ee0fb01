"""Schema validation of tool parameters, reporting every violation by path.

Messages are written here rather than taken from jsonschema, whose text quotes the offending
value (a customer's email, say): an error body must never echo customer data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonschema import Draft7Validator, ValidationError

from server.errors import InvalidParameters, Violation


class ParameterValidator:
    def __init__(self, tool_name: str, schema: Mapping[str, Any]) -> None:
        self._tool_name = tool_name
        self._validator = Draft7Validator(schema)
        self._known = frozenset(schema.get("properties", {}))

    def check(self, parameters: Any) -> None:
        """Raise InvalidParameters listing every violation, or return for valid parameters.

        Unknown parameters are refused too: a misspelt customer field would otherwise vanish
        silently and lower match quality without anyone noticing.
        """
        violations = [
            v for error in self._validator.iter_errors(parameters) for v in self._explain(error)
        ]
        if isinstance(parameters, dict):
            violations += [
                Violation(f"parameters.{name}", f"is not a parameter of {self._tool_name}")
                for name in parameters
                if name not in self._known
            ]
        if violations:
            raise InvalidParameters(sorted(set(violations), key=lambda v: v.path))

    @staticmethod
    def _explain(error: ValidationError) -> list[Violation]:
        path = ".".join(["parameters", *(str(p) for p in error.absolute_path)])
        kind = error.validator
        expected: Any = error.validator_value
        if kind == "required":
            present = error.instance if isinstance(error.instance, dict) else {}
            return [
                Violation(f"{path}.{name}", "is required")
                for name in expected
                if name not in present
            ]
        if kind == "type":
            return [Violation(path, f"must be of type {expected}")]
        if kind == "enum":
            return [Violation(path, f"must be one of: {', '.join(map(str, expected))}")]
        return [Violation(path, f"does not satisfy '{kind}'")]
