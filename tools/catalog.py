"""The tool catalog: each tool module joined with its parameters schema from openapi.json.

openapi.json is the single source of every schema (`components.schemas[<tool name>]`), so
what is published is exactly what Run Tool validates against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from tools import funnel_event
from tools.base import Tool

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.json"
_MODULES = (funnel_event,)


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
            schema=schemas[module.NAME],
            build=module.build,
        )
        for module in _MODULES
    }
