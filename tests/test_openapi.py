"""openapi.json: valid, served, complete, and good enough to generate a working client."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
from openapi_spec_validator import validate

from server.app import create_app
from server.delivery.transport import HttpxTransport
from tests.live import serving
from tests.support import NOW, PROJECT, FakeGraph, funnel_parameters
from tools.catalog import OPENAPI_PATH

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = json.loads(OPENAPI_PATH.read_text())


def test_document_is_valid_openapi():
    validate(DOCUMENT)


def test_document_is_served(client):
    assert client.get("/openapi.json").json() == DOCUMENT


def test_every_route_is_documented(client):
    served = {
        (route.path, method.lower())
        for route in client.app.routes
        for method in (getattr(route, "methods", None) or {"POST"}) - {"HEAD"}
    }
    documented = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    assert served <= documented


def test_every_error_code_is_documented_in_openapi_and_readme():
    codes = set(
        re.findall(
            r'code\s*=\s*"([A-Z_]+)"',
            "".join(p.read_text() for p in (ROOT / "server").rglob("*.py")),
        )
    )
    documented = set(DOCUMENT["components"]["schemas"]["Error"]["properties"]["code"]["enum"])
    readme = (ROOT / "README.md").read_text()
    assert codes and codes <= documented
    assert all(f"`{code}`" in readme for code in documented)


def test_a_generated_client_runs_a_tool(tmp_path, config, sign):
    subprocess.run(
        [str(Path(sys.executable).parent / "openapi-python-client"), "generate", "--path", str(OPENAPI_PATH),
         "--meta", "none", "--output-path", str(tmp_path / "fgclient")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    sys.path.insert(0, str(tmp_path))
    try:
        fgclient = importlib.import_module("fgclient")
        run_tool = importlib.import_module("fgclient.api.default.run_tool")
        models = importlib.import_module("fgclient.models")
        graph = FakeGraph()
        app = create_app(
            config,
            graph_transport=HttpxTransport(httpx.MockTransport(graph.handler)),
            clock=lambda: NOW,
        )
        with (
            serving(app) as base_url,
            fgclient.AuthenticatedClient(base_url=base_url, token=sign()) as client,
        ):
            body = models.RunToolRequest.from_dict(
                {"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": funnel_parameters()}
            )
            response = run_tool.sync_detailed(PROJECT, client=client, body=body)
        assert response.status_code == 200
        assert response.parsed.events_received == 1
        assert graph.bodies()[0]["data"][0]["event_id"] == "order-1001"
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "fgclient" or m.startswith("fgclient.")]:
            del sys.modules[name]
