"""The tool catalog: each tool joined with its parameters schema from openapi.json.

openapi.json is the single source of every schema. A tool's schema is its component
(`components.schemas[<tool.schema>]`, the published one verbatim for ActionKit tools), plus the
properties of any extension components it names, with `$ref`s inlined so the result stands
alone (List Tools, MCP inputSchema), bounded (tools/limits.py: free-form values refer to the
schema's own `$defs`). That merged schema is exactly what Run Tool validates.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tools import funnel_event, lead_event, meta_conversion_event, send_events
from tools.base import Tool
from tools.limits import bounded

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.json"
TOOLS: tuple[Tool, ...] = (
    funnel_event.TOOL,
    lead_event.TOOL,
    meta_conversion_event.TOOL,
    send_events.TOOL,
)


@dataclass(frozen=True)
class Entry:
    """A tool and its resolved, self-contained parameters schema."""

    tool: Tool
    schema: Mapping[str, Any] = field(repr=False)


def load_openapi(path: Path = OPENAPI_PATH) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(path.read_bytes())
    return document


def load_catalog(openapi: dict[str, Any] | None = None) -> dict[str, Entry]:
    schemas = (openapi or load_openapi())["components"]["schemas"]
    return {tool.name: Entry(tool, tool_schema(schemas, tool)) for tool in TOOLS}


def served_openapi(
    openapi: dict[str, Any], catalog: Mapping[str, Entry], *, sandbox: bool
) -> dict[str, Any]:
    """openapi.json as the server states it: each tool's parameters schema (found through
    RunToolRequest's discriminator) is the one Run Tool validates, bounds included, so clients
    and schemathesis see the real contract; /sandbox/events is listed only when served.

    A tool schema's `$defs` become components (the same names in every tool define the same
    values): inside the document, `#/$defs/...` would point at the document's root."""
    document = copy.deepcopy(openapi)
    schemas = document["components"]["schemas"]
    for name, call in schemas["RunToolRequest"]["discriminator"]["mapping"].items():
        parameters = schemas[_component(call)]["properties"]["parameters"]["$ref"]
        schema = dict(catalog[name].schema)
        for definition, value in schema.pop("$defs", {}).items():
            schemas[definition] = _components_refs(value)
        schemas[_component(parameters)] = _components_refs(schema)
    if not sandbox:
        del document["paths"]["/sandbox/events"]
    return document


def _component(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _components_refs(node: Any) -> Any:
    """A copy of `node` with its `#/$defs/X` references pointing at `#/components/schemas/X`."""
    if isinstance(node, dict):
        return {
            key: "#/components/schemas/" + _component(value)
            if key == "$ref" and value.startswith("#/$defs/")
            else _components_refs(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_components_refs(item) for item in node]
    return node


def tool_schema(schemas: dict[str, Any], tool: Tool) -> dict[str, Any]:
    """The published schema plus extension properties, closed to unknown parameters (a
    misspelt customer field would otherwise vanish silently), every value bounded (limits.py)."""
    schema = copy.deepcopy(schemas[tool.schema])
    for extension in tool.extensions:
        schema["properties"].update(copy.deepcopy(schemas[extension]["properties"]))
    schema["additionalProperties"] = False
    resolved: dict[str, Any] = bounded(inline_refs(schema, schemas))
    return resolved


def inline_refs(node: Any, schemas: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = schemas[node["$ref"].rsplit("/", 1)[-1]]
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            return inline_refs({**target, **siblings}, schemas)
        return {key: inline_refs(value, schemas) for key, value in node.items()}
    if isinstance(node, list):
        return [inline_refs(item, schemas) for item in node]
    return node
