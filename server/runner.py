"""Run Tool: validate, map, resolve the credential, deliver. HTTP-free, so every entry point
(the ActionKit routes, MCP) shares one path."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from server.config import Project
from server.delivery.graph import Delivery, GraphClient, Sender, request_body
from server.errors import IntegrationNotEnabled, NotFound, UpstreamError
from server.storage.credentials import CredentialStore
from server.validation import ParameterValidator
from tools.base import BuildContext, EventBatch, Tool
from tools.capi import match_keys


def new_event_id() -> str:
    return uuid.uuid4().hex


class Runner:
    def __init__(
        self,
        tools: Mapping[str, Tool],
        credentials: CredentialStore,
        graph: GraphClient,
        *,
        sender: Sender | None = None,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = new_event_id,
    ) -> None:
        self.tools = tools
        self._validators = {name: ParameterValidator(name, t.schema) for name, t in tools.items()}
        self._credentials = credentials
        self._graph = graph
        self._sender = sender or graph  # e.g. a Coalescer in front of the client
        self._clock = clock
        self._new_id = new_id

    def has_credential(self, project: Project, user_id: str) -> bool:
        return bool(project.facebook_access_token or self._credentials.get(project.id, user_id))

    def access_token(self, project: Project, user_id: str) -> str:
        """The user's own credential wins over the project-wide token."""
        token = self._credentials.get(project.id, user_id) or project.facebook_access_token
        if token is None:
            raise IntegrationNotEnabled
        return token

    def prepare(self, project: Project, tool_name: str, parameters: Any) -> EventBatch:
        """Validated, mapped, hashed events for one call; no I/O."""
        tool = self.tools.get(tool_name)
        if tool is None:
            raise NotFound(f"Unknown tool {tool_name!r}.", code="UNKNOWN_TOOL")
        self._validators[tool_name].check(parameters)
        ctx = BuildContext(
            now=self._clock(),
            new_event_id=self._new_id,
            phone_region=project.default_phone_region,
            test_event_code=project.test_event_code,
        )
        return tool.build(parameters, ctx)

    async def run(self, project: Project, user_id: str, tool_name: str, parameters: Any) -> Any:
        """The tool's answer from Meta's (by default Meta's JSON, unwrapped). Nothing is sent
        unless every check passed."""
        batch = self.prepare(project, tool_name, parameters)
        token = self.access_token(project, user_id)
        delivery = Delivery(batch, token, project.facebook_app_secret)
        try:
            answer = await self._sender.send(delivery, project_id=project.id)
        except UpstreamError as exc:
            exc.event_ids = batch.event_ids  # resending with these ids stays deduplicated
            raise
        return self.tools[tool_name].present(answer, parameters)

    def dry_run(
        self, project: Project, user_id: str, tool_name: str, parameters: Any
    ) -> dict[str, Any]:
        """The exact Graph request the call would make, token withheld; sends nothing."""
        batch = self.prepare(project, tool_name, parameters)
        body = request_body(Delivery(batch, access_token=""))
        del body["access_token"]
        return {
            "dry_run": True,
            "integration_enabled": self.has_credential(project, user_id),
            "request": {"method": "POST", "url": self._graph.url(batch.pixel_id), "body": body},
            "match_keys": [match_keys(event) for event in batch.events],
        }
