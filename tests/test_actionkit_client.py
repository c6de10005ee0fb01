"""A client generated from ActionKit's own published OpenAPI works against funnelgate with only
its base URL and token changed.

tests/data/actionkit_send_funnel_event.yaml is Paragon's published "Send Funnel Event" document
(path `/projects/{project_id}/tools/#FACEBOOK_ADS_SEND_FUNNEL_EVENT`). openapi-python-client keeps
that path as written; httpx drops the `#...` fragment, so the client posts to `.../tools/`, with
the trailing slash, and must get its answer there (no redirect: httpx clients do not follow one).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from server.app import create_app
from tests.live import serving
from tests.support import NOW, PIXEL, PROJECT, FakeGraph, funnel_parameters

PUBLISHED = Path(__file__).resolve().parent / "data" / "actionkit_send_funnel_event.yaml"
PACKAGE = "actionkit_client"


@pytest.fixture(scope="module")
def actionkit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModuleType]]:
    """The client package generated from the published document, imported."""
    out = tmp_path_factory.mktemp("generated")
    subprocess.run(
        [str(Path(sys.executable).parent / "openapi-python-client"), "generate", "--path", str(PUBLISHED),
         "--meta", "none", "--output-path", str(out / PACKAGE)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    sys.path.insert(0, str(out))
    try:
        yield {
            "client": importlib.import_module(PACKAGE),
            "operation": importlib.import_module(
                f"{PACKAGE}.api.default.post_projects_project_id_tools_facebook_ads_send_funnel_event"
            ),
            "models": importlib.import_module(f"{PACKAGE}.models"),
        }
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def test_the_published_client_sends_a_funnel_event_through_funnelgate(actionkit, config, sign):
    graph = FakeGraph()
    app = create_app(config, graph_transport=graph.transport(), clock=lambda: NOW)
    sent: list[httpx.Request] = []
    models = actionkit["models"]
    # The body as a user of the published client builds it: typed parameters, and `tool` left
    # to the published default (FACEBOOK_ADS_SEND_FUNNEL_EVENT).
    body = models.PostProjectsProjectIdToolsFacebookAdsSendFunnelEventBody(
        parameters=models.PostProjectsProjectIdToolsFacebookAdsSendFunnelEventBodyParameters.from_dict(
            funnel_parameters()
        )
    )
    # What a user changes: the base URL (ActionKit's is https://actionkit.useparagon.com)
    # and the token (a funnelgate project's user token). Nothing else.
    with (
        serving(app) as base_url,
        actionkit["client"].AuthenticatedClient(
            base_url=base_url,
            token=sign(),
            httpx_args={"event_hooks": {"request": [sent.append]}},
        ) as client,
    ):
        response = actionkit["operation"].sync_detailed(PROJECT, client=client, body=body)

    assert [(r.method, r.url.path) for r in sent] == [("POST", f"/projects/{PROJECT}/tools/")]
    assert json.loads(sent[0].content)["tool"] == "FACEBOOK_ADS_SEND_FUNNEL_EVENT"
    assert response.status_code == 200, response.content
    assert json.loads(response.content) == {
        "events_received": 1, "messages": [], "fbtrace_id": "AbC123"}  # fmt: skip

    [graph_request] = graph.received
    assert graph_request.path == f"/v24.0/{PIXEL}/events"
    [event] = graph_request.json()["data"]
    assert event["event_name"] == "Purchase" and event["event_id"] == "order-1001"
    assert event["user_data"]["em"] == [hashlib.sha256(b"joe.smith@example.com").hexdigest()]
    assert event["custom_data"]["content_ids"] == ["ABC123", "XYZ789"]
