"""Run Tool: validate, map, resolve the credential, deliver. HTTP-free, so every entry point
(the ActionKit routes today) shares one path."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from server.config import Project
from server.delivery.graph import Delivery, GraphClient
from server.errors import IntegrationNotEnabled, NotFound, UpstreamError
from server.storage.credentials import CredentialStore
from server.validation import ParameterValidator
from tools.base import BuildContext, EventBatch, Tool


def new_event_id() -> str:
    return uuid.uuid4().hex


class Runner:
    def __init__(
        self,
        tools: Mapping[str, Tool],
        credentials: CredentialStore,
        graph: GraphClient,
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = new_event_id,
    ) -> None:
        self._tools = tools
        self._validators = {name: ParameterValidator(name, t.schema) for name, t in tools.items()}
        self._credentials = credentials
        self._graph = graph
        self._clock = clock
        self._new_id = new_id

    def access_token(self, project: Project, user_id: str) -> str:
        """The user's own credential wins over the project-wide token."""
        token = self._credentials.get(project.id, user_id) or project.facebook_access_token
        if token is None:
            raise IntegrationNotEnabled
        return token

    async def run(
        self, project: Project, user_id: str, tool_name: str, parameters: Any
    ) -> dict[str, Any]:
        """Meta's answer, unwrapped. Nothing is sent unless every check passed."""
        tool = self._tools.get(tool_name)
        if tool is None:
            raise NotFound(f"Unknown tool {tool_name!r}.", code="UNKNOWN_TOOL")
        self._validators[tool_name].check(parameters)
        batch = tool.build(parameters, BuildContext(now=self._clock(), new_event_id=self._new_id))
        token = self.access_token(project, user_id)
        delivery = Delivery(batch, token, project.facebook_app_secret)
        try:
            return await self._graph.send(delivery, project_id=project.id)
        except UpstreamError as exc:
            exc.event_ids = batch.event_ids  # resending with these ids stays deduplicated
            raise
