"""The tool catalog: each tool module joined with its parameters schema from openapi.json.

openapi.json is the single source of every schema. A tool's schema is its component
(`components.schemas[<tool name>]`, the published one verbatim for ActionKit tools), plus the
properties of any extension components it names, with `$ref`s inlined so the result stands
alone (List Tools, MCP inputSchema). That merged schema is exactly what Run Tool validates.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from tools import funnel_event, lead_event, meta_conversion_event, send_events
from tools.base import Tool, as_json

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.json"
EXTENSIONS = "FACEBOOK_ADS_EXTENSIONS"
# Tool module -> extension components merged into its published schema.
_MODULES: tuple[tuple[ModuleType, tuple[str, ...]], ...] = (
    (funnel_event, (EXTENSIONS,)),
    (lead_event, (EXTENSIONS,)),
    (meta_conversion_event, ()),
    (send_events, ()),
)
CATEGORIES = {"facebookAds": ("advertising",)}


def load_openapi(path: Path = OPENAPI_PATH) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(path.read_bytes())
    return document


def load_tools(openapi: dict[str, Any] | None = None) -> dict[str, Tool]:
    schemas = (openapi or load_openapi())["components"]["schemas"]
    return {
        module.NAME: Tool(
            name=module.NAME,
            integration=module.INTEGRATION,
            description=module.DESCRIPTION,
            schema=tool_schema(schemas, module.NAME, extensions),
            build=module.build,
            present=getattr(module, "present", as_json),
        )
        for module, extensions in _MODULES
    }


def tool_schema(schemas: dict[str, Any], name: str, extensions: tuple[str, ...]) -> dict[str, Any]:
    """The published schema plus extension properties, closed to unknown parameters (a
    misspelt customer field would otherwise vanish silently)."""
    schema = copy.deepcopy(schemas[name])
    for extension in extensions:
        schema["properties"].update(copy.deepcopy(schemas[extension]["properties"]))
    schema["additionalProperties"] = False
    resolved: dict[str, Any] = _inline_refs(schema, schemas)
    return resolved


def _inline_refs(node: Any, schemas: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = schemas[node["$ref"].rsplit("/", 1)[-1]]
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            return _inline_refs({**target, **siblings}, schemas)
        return {key: _inline_refs(value, schemas) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(item, schemas) for item in node]
    return node
