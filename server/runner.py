"""Run Tool: validate, map, resolve the credential, deliver. HTTP-free, so every entry point
(the ActionKit routes, MCP) shares one path."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from server.config import Project
from server.delivery.graph import Delivery, Sender, request_body
from server.errors import IntegrationNotEnabled, InvalidParameters, NotFound
from server.logs import clip
from server.storage.credentials import CredentialStore
from server.validation import ParameterValidator
from tools.base import Answer, BuildContext, EventBatch, InvalidEvent, Violation
from tools.capi import match_keys
from tools.catalog import Entry


def new_event_id() -> str:
    return uuid.uuid4().hex


def unknown_tool(name: str) -> NotFound:
    """The caller's tool name, capped: it is caller text."""
    return NotFound(f"Unknown tool {clip(name, 100)!r}.", code="UNKNOWN_TOOL")


class Runner:
    def __init__(
        self,
        catalog: Mapping[str, Entry],
        credentials: CredentialStore,
        sender: Sender,
        *,
        graph_url: Callable[[str], str],
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = new_event_id,
    ) -> None:
        self.catalog = catalog
        self._validators = {
            name: ParameterValidator(name, entry.schema) for name, entry in catalog.items()
        }
        self._credentials = credentials
        self._sender = sender  # the Graph client, or a Coalescer in front of it
        self._graph_url = graph_url
        self._clock = clock
        self._new_id = new_id

    def has_credential(self, project: Project, user_id: str) -> bool:
        return bool(project.facebook_access_token) or self._credentials.has(project.id, user_id)

    def access_token(self, project: Project, user_id: str) -> str:
        """The user's own credential wins over the project-wide token."""
        token = self._credentials.get(project.id, user_id) or project.facebook_access_token
        if token is None:
            raise IntegrationNotEnabled
        return token

    def prepare(
        self,
        project: Project,
        tool_name: str,
        parameters: Any,
        new_id: Callable[[], str] | None = None,
    ) -> EventBatch:
        """Validated, mapped, hashed events for one call; no I/O. `new_id` makes the ids of
        events without `eventId` (an Idempotency-Key derives them: server/idempotency.py)."""
        entry = self.catalog.get(tool_name)
        if entry is None:
            raise unknown_tool(tool_name)
        self._validators[tool_name].check(parameters)
        ctx = BuildContext(
            now=self._clock(),
            new_event_id=new_id or self._new_id,
            phone_region=project.default_phone_region,
            test_event_code=project.test_event_code,
        )
        try:
            return entry.tool.build(parameters, ctx)
        except InvalidEvent as exc:
            raise InvalidParameters(exc.violations) from None

    async def run(
        self,
        project: Project,
        user_id: str,
        tool_name: str,
        parameters: Any,
        *,
        new_id: Callable[[], str] | None = None,
    ) -> Answer:
        """The tool's answer from Meta's (by default Meta's JSON, unwrapped). Nothing is sent
        unless every check passed."""
        batch = self.prepare(project, tool_name, parameters, new_id)
        token = self.access_token(project, user_id)
        try:
            delivery = Delivery(batch, token, project.facebook_app_secret)
        except orjson.JSONEncodeError:
            raise InvalidParameters([Violation("parameters", "cannot be sent as JSON")]) from None
        answer = await self._sender.send(delivery, project_id=project.id)
        return self.catalog[tool_name].tool.present({**answer, **_warnings(batch)}, parameters)

    def dry_run(
        self,
        project: Project,
        user_id: str,
        tool_name: str,
        parameters: Any,
        *,
        new_id: Callable[[], str] | None = None,
    ) -> dict[str, Any]:
        """The exact Graph request the call would make, less credentials; sends nothing."""
        batch = self.prepare(project, tool_name, parameters, new_id)
        return {
            "dry_run": True,
            "integration_enabled": self.has_credential(project, user_id),
            "request": {
                "method": "POST",
                "url": self._graph_url(batch.pixel_id),
                "body": request_body(batch),
            },
            "match_keys": [match_keys(event) for event in batch.events],
            **_warnings(batch),
        }


def _warnings(batch: EventBatch) -> dict[str, Any]:
    """What the mapping dropped or rewrote, by path (never a value); nothing when all is well."""
    if not batch.warnings:
        return {}
    return {"warnings": [{"path": w.path, "message": w.message} for w in batch.warnings]}
