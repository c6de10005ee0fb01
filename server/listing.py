"""List Tools: the catalog in ActionKit's two formats, `json_schema` (for LLM tool calling)
and `paragon` (inputs described for a form builder)."""

from __future__ import annotations

import re
from typing import Any

from tools.catalog import Entry

FORMATS = ("json_schema", "paragon")


def as_function(entry: Entry) -> dict[str, Any]:
    tool = entry.tool
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": entry.schema,
        },
    }


def as_paragon(entry: Entry) -> dict[str, Any]:
    tool, schema = entry.tool, entry.schema
    required = set(schema.get("required", []))
    return {
        "name": tool.name,
        "title": _humanize(tool.name),
        "description": tool.description,
        "inputs": [
            _input(name, prop, name in required) for name, prop in schema["properties"].items()
        ],
    }


def _input(name: str, prop: dict[str, Any], required: bool) -> dict[str, Any]:
    # Published descriptions read "Title : explanation"; the others are plain sentences.
    description = prop.get("description", "")
    title, _, subtitle = description.partition(" : ")
    if not subtitle and len(title) > 40:
        title, subtitle = _humanize(name), description
    field: dict[str, Any] = {"id": name, "title": title or _humanize(name), "required": required}
    if subtitle:
        field["subtitle"] = subtitle
    if "enum" in prop:
        field["type"] = "ENUM"
        field["values"] = [{"value": v, "label": str(v)} for v in prop["enum"]]
    elif prop.get("type") == "boolean":
        field["type"] = "BOOLEAN_INPUT"
    elif prop.get("type") in ("object", "array") or "oneOf" in prop:
        field["type"] = "CODE"  # JSON typed into a code editor
    else:
        field["type"] = "TEXT"
        if prop.get("type") in ("number", "integer"):
            field["dataType"] = "number"
    return field


def _humanize(name: str) -> str:
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).replace("_", " ").split()
    return " ".join(w.capitalize() if w.isupper() or w.islower() else w for w in words)
