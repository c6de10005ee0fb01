"""Run Tool: validate, map, resolve the credential, then deliver now or queue. HTTP-free, so
every entry point (the ActionKit routes, MCP) shares one path.

The credential is the one the caller names (ActionKit's `X-Paragon-Credential`: an id, or
`ext:` and an external id), else the user's default one, else the project's token, and the
token's JWT Permissions must grant it (permissions.py).

Sync mode waits for Meta's answer within the call's budget; when Meta is unavailable, slow or
throttling, the events are queued instead and the call answers `Queued` (a 202 over HTTP).
Queued mode answers `Queued` as soon as the events are on disk. Either way a queued event is
the dispatcher's (dispatcher.py) until Meta has it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import quote

import orjson

from server.config import Config, Project
from server.delivery.graph import Delivery, Sender, request_body
from server.errors import (
    CredentialNotFound,
    Forbidden,
    IntegrationNotEnabled,
    InvalidParameters,
    NotFound,
    QueueFull,
    UpstreamAuth,
    UpstreamError,
    UpstreamUnavailable,
)
from server.logs import clip, log
from server.observe import Observers
from server.permissions import UNRESTRICTED, Permissions
from server.storage import credentials, outbox
from server.storage.credentials import Credential, Credentials
from server.storage.outbox import NewEvent, Outbox
from server.validation import ParameterValidator
from tools.base import Answer, BuildContext, EventBatch, InvalidEvent, Violation
from tools.capi import match_keys
from tools.catalog import Entry

# A handed-over sync send may still take this long past its attempt timeout before the
# dispatcher may resend its events.
_LEASE_MARGIN_SECONDS = 5.0


def new_event_id() -> str:
    return uuid.uuid4().hex


def unknown_tool(name: str) -> NotFound:
    """The caller's tool name, capped: it is caller text."""
    return NotFound(f"Unknown tool {clip(name, 100)!r}.", code="UNKNOWN_TOOL")


@dataclass(frozen=True)
class Preferences:
    """What the caller asked for (RFC 7240 `Prefer` over HTTP)."""

    respond_async: bool = False
    wait: float | None = None  # seconds: caps the sync budget


@dataclass(frozen=True)
class Queued:
    """The events are on disk and the dispatcher will deliver them."""

    event_ids: list[str]
    reason: str  # "requested", "queued_mode" or "meta_unavailable"
    warnings: list[Violation] = field(default_factory=list)
    error: dict[str, Any] | None = None  # why Meta could not take them now, when it failed

    def body(self, project_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "queued",
            "event_ids": self.event_ids,
            "events_received": len(self.event_ids),
            "reason": self.reason,
        }
        if self.event_ids:
            body["status_url"] = status_path(project_id, self.event_ids[0])
        if self.error:
            body["upstream"] = self.error
        return {**body, **_warnings(self.warnings)}


class Access(NamedTuple):
    """What a call may use: the credential it names (ActionKit's X-Paragon-Credential), and
    its token's JWT Permissions."""

    selector: str | None = None
    permissions: Permissions = UNRESTRICTED


OWN = Access()  # the user's default credential, everything the user has


@dataclass(frozen=True, slots=True)
class Account:
    """The credential a call goes with: one of the user's, or the project's token (None)."""

    credential: Credential | None
    source: str  # "header", "default" or "project"

    @property
    def credential_id(self) -> str | None:
        return None if self.credential is None else self.credential.id

    def public(self) -> dict[str, Any]:
        """What the dry run shows: which credential, never its token."""
        found = self.credential
        return {
            "id": None if found is None else found.id,
            "label": None if found is None else found.label,
            "source": self.source,
            "status": "valid" if found is None else found.status,
        }


def status_path(project_id: str, event_id: str) -> str:
    return f"/projects/{quote(project_id, safe='')}/events/{quote(event_id, safe='')}"


class Runner:
    def __init__(
        self,
        catalog: Mapping[str, Entry],
        credentials: Credentials,
        sender: Sender,
        queue: Outbox,
        config: Config,
        *,
        graph_url: Callable[[str], str],
        wake_dispatcher: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = new_event_id,
        observers: Observers | None = None,
    ) -> None:
        self.catalog = catalog
        self._validators = {
            name: ParameterValidator(name, entry.schema) for name, entry in catalog.items()
        }
        self._credentials = credentials
        self._sender = sender  # the Graph client, or a Coalescer in front of it
        self._queue = queue
        self._config = config
        self._graph_url = graph_url
        self._wake = wake_dispatcher
        self._clock = clock
        self._new_id = new_id
        self._observers = observers or Observers()
        self._settling: set[asyncio.Task[Any]] = set()

    async def account(
        self,
        project: Project,
        user_id: str,
        integration: str,
        access: Access = OWN,
    ) -> Account | None:
        """The credential a call of this user goes with (None: there is none); raises
        CredentialNotFound for a selector that names none of the user's, Forbidden when the
        token may not use it."""
        selector, permissions = access
        _permit(permissions, integration)
        found = await self._credentials.find(project.id, user_id, selector)
        if selector is not None and found is None:
            raise CredentialNotFound
        if found is None and not project.facebook_access_token:
            return None
        if not permissions.may_use_credential(integration, None if found is None else found.id):
            raise Forbidden(
                "This user token's permissions do not grant this credential"
                + ("." if selector else "; name a granted one with X-Paragon-Credential."),
                code="CREDENTIAL_FORBIDDEN",
            )
        source = "header" if selector else "default" if found else "project"
        return Account(found, source)

    async def named(self, project: Project, user_id: str, selector: str) -> Credential:
        """The user's credential `selector` names; CredentialNotFound when it names none."""
        found = await self._credentials.find(project.id, user_id, selector)
        if found is None:
            raise CredentialNotFound
        return found

    async def authorize(
        self,
        project: Project,
        user_id: str,
        tool_name: str,
        access: Access = OWN,
    ) -> None:
        """The checks a call of the tool passes before any work (an Idempotency-Key replay
        passes them too): the token may use the tool's integration and the credential."""
        integration = self._entry(tool_name).tool.integration.name
        await self.account(project, user_id, integration, access)

    async def available(
        self,
        project: Project,
        user_id: str,
        integration: str,
        access: Access = OWN,
    ) -> bool:
        """Whether List Tools' `limit_to_available` shows the integration: a permitted
        credential that Meta has not refused."""
        try:
            account = await self.account(project, user_id, integration, access)
        except Forbidden:
            return False
        return account is not None and (
            account.credential is None or account.credential.status == "valid"
        )

    async def credential_status(self, project_id: str, credential_id: str | None) -> str | None:
        """valid, invalid or removed; None for the project's token."""
        if credential_id is None:
            return None
        found = await self._credentials.by_id(project_id, credential_id)
        return "removed" if found is None else found.status

    def _token(self, project: Project, account: Account) -> str:
        if account.credential is None:
            assert project.facebook_access_token is not None
            return project.facebook_access_token
        return self._credentials.open(project.id, account.credential)

    def _entry(self, tool_name: str) -> Entry:
        entry = self.catalog.get(tool_name)
        if entry is None:
            raise unknown_tool(tool_name)
        return entry

    def prepare(
        self,
        project: Project,
        tool_name: str,
        parameters: Any,
        *,
        new_id: Callable[[], str] | None = None,
    ) -> EventBatch:
        """Validated, mapped, hashed events for one call; no I/O. `new_id` makes the ids of
        events the caller gave none (an Idempotency-Key makes them repeatable)."""
        entry = self._entry(tool_name)
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

    async def _checked(
        self,
        project: Project,
        user_id: str,
        tool_name: str,
        parameters: Any,
        *,
        new_id: Callable[[], str] | None,
        access: Access,
    ) -> tuple[EventBatch, Account | None]:
        """The call's events and its credential, once every check passed: the permissions
        before any work on the input, then validation and mapping, then the credential."""
        integration = self._entry(tool_name).tool.integration.name
        _permit(access.permissions, integration)
        batch = self.prepare(project, tool_name, parameters, new_id=new_id)
        return batch, await self.account(project, user_id, integration, access)

    async def run(
        self,
        project: Project,
        user_id: str,
        tool_name: str,
        parameters: Any,
        *,
        prefer: Preferences = Preferences(),
        new_id: Callable[[], str] | None = None,
        access: Access = OWN,
    ) -> Answer | Queued:
        """The tool's answer from Meta's (by default Meta's JSON, unwrapped), or `Queued`.
        Nothing is sent or queued unless every check passed."""
        batch, account = await self._checked(
            project, user_id, tool_name, parameters, new_id=new_id, access=access
        )
        if account is None:
            raise IntegrationNotEnabled
        if prefer.respond_async or self._config.delivery_mode(project) == "queued":
            # The token is opened when sending: its credential is what the row keeps.
            await self._enqueue(project.id, user_id, account.credential_id, batch)
            self._observers.accepted(project.id, batch)
            reason = "requested" if prefer.respond_async else "queued_mode"
            return Queued(batch.event_ids, reason, batch.warnings)
        try:
            delivery = Delivery(batch, self._token(project, account), project.facebook_app_secret)
        except orjson.JSONEncodeError:
            raise _not_json() from None
        budget = self._config.delivery.sync_budget_seconds
        if prefer.wait is not None:
            budget = min(budget, prefer.wait)
        sent = self._sender.submit(delivery, project_id=project.id, budget=budget)
        self._observers.accepted(project.id, batch)
        try:
            done = await _within(sent, budget)
        except asyncio.CancelledError:
            sent.add_done_callback(_observed)
            raise
        if not done:
            return await self._hand_over(project.id, user_id, account.credential_id, batch, sent)
        try:
            answer = sent.result()
        except UpstreamUnavailable as exc:
            error = {"code": exc.code, "message": exc.message, "upstream": exc.upstream}
            attempts = int(exc.upstream.get("attempts", 0))
            await self._enqueue(
                project.id, user_id, account.credential_id, batch, attempts=attempts, error=error
            )
            self._observers.retried(project.id, batch.pixel_id, len(batch.events))
            return Queued(batch.event_ids, "meta_unavailable", batch.warnings, error)
        except UpstreamError as exc:
            self._observers.failed(project.id, batch.pixel_id, _names(batch), exc.code)
            if isinstance(exc, UpstreamAuth) and account.credential is not None:
                await self._invalidate(project.id, account.credential, exc)
            raise
        self._observers.delivered(project.id, batch.pixel_id, _names(batch))
        return self.catalog[tool_name].tool.present(
            {**answer, **_warnings(batch.warnings)}, parameters
        )

    async def _invalidate(self, project_id: str, credential: Credential, exc: UpstreamAuth) -> None:
        """Meta refused the credential's token: it shows as invalid until it is set again
        (unless the token was replaced while the request was out)."""
        error = {"code": exc.code, "message": exc.message, "upstream": exc.upstream}
        try:
            await self._queue.write(
                lambda db: credentials.mark_invalid(
                    db, project_id, credential.id, error, refused=credential.sealed_token
                )
            )
        except Exception as failure:  # the caller still gets Meta's refusal
            log("credential_status_failed", logging.ERROR, project=project_id,
                error=type(failure).__name__)  # fmt: skip

    async def _enqueue(
        self,
        project_id: str,
        user_id: str,
        credential_id: str | None,
        batch: EventBatch,
        *,
        next_at: float | None = None,
        attempts: int = 0,
        error: dict[str, Any] | None = None,
    ) -> list[int]:
        """On disk when this returns; the dispatcher is told at once."""
        limit = self._config.delivery.max_queued_events
        if self._queue.pending + len(batch.events) > limit:
            raise QueueFull(limit)
        try:
            events = [
                NewEvent(
                    project_id,
                    user_id,
                    credential_id,
                    batch.pixel_id,
                    batch.test_event_code,
                    e,
                    orjson.dumps(e),
                )
                for e in batch.events
            ]
        except orjson.JSONEncodeError:
            raise _not_json() from None
        seqs = await self._queue.enqueue(events, next_at=next_at, attempts=attempts, error=error)
        self._observers.queued(project_id, batch.pixel_id, len(events))
        self._wake()
        return seqs

    async def _hand_over(
        self,
        project_id: str,
        user_id: str,
        credential_id: str | None,
        batch: EventBatch,
        sent: asyncio.Future[dict[str, Any]],
    ) -> Queued:
        """The budget ran out with Meta's answer still due: queue the events under a lease
        that outlasts the send, and settle them by its outcome (not a second request)."""
        lease = self._sender.attempt_timeout() + _LEASE_MARGIN_SECONDS
        try:
            seqs = await self._enqueue(
                project_id, user_id, credential_id, batch, next_at=self._clock() + lease
            )
        except BaseException:
            sent.add_done_callback(_observed)
            raise

        def settle(sent: asyncio.Future[dict[str, Any]]) -> None:
            task = asyncio.ensure_future(self._settle(sent, seqs, project_id, batch))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

        sent.add_done_callback(settle)
        return Queued(batch.event_ids, "meta_unavailable", batch.warnings)

    async def _settle(
        self,
        sent: asyncio.Future[dict[str, Any]],
        seqs: list[int],
        project_id: str,
        batch: EventBatch,
    ) -> None:
        now = self._clock()
        answer = None if sent.cancelled() or sent.exception() else sent.result()
        try:
            if answer is not None:
                trace = answer.get("fbtrace_id")
                done = await self._queue.write(
                    lambda db: outbox.mark_delivered(db, seqs, now=now, fbtrace_id=trace)
                )
                self._queue.finished(done)
                self._observers.delivered(project_id, batch.pixel_id, _names(batch))
            else:  # the dispatcher takes them from here, with its own judgement
                due = [(seq, now) for seq in seqs]
                await self._queue.write(
                    lambda db: outbox.reschedule(db, due, now=now, error=None, attempted=True)
                )
                self._observers.retried(project_id, batch.pixel_id, len(seqs))
                self._wake()
        except Exception as exc:  # the lease runs out and the dispatcher sends them
            log("handover_settle_failed", logging.ERROR, project=project_id,
                error=type(exc).__name__)  # fmt: skip

    async def drain(self) -> None:
        """Waits for the settling of handed-over sends (shutdown)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def dry_run(
        self,
        project: Project,
        user_id: str,
        tool_name: str,
        parameters: Any,
        *,
        new_id: Callable[[], str] | None = None,
        access: Access = OWN,
    ) -> dict[str, Any]:
        """The exact Graph request the call would make, less credentials, and which
        credential it would go with; sends nothing."""
        batch, account = await self._checked(
            project, user_id, tool_name, parameters, new_id=new_id, access=access
        )
        return {
            "dry_run": True,
            "integration_enabled": account is not None,
            "credential": None if account is None else account.public(),
            "request": {
                "method": "POST",
                "url": self._graph_url(batch.pixel_id),
                "body": request_body(batch),
            },
            "match_keys": [match_keys(event) for event in batch.events],
            "delivery_mode": self._config.delivery_mode(project),
            **_warnings(batch.warnings),
        }


def _names(batch: EventBatch) -> list[str]:
    return [str(event["event_name"]) for event in batch.events]


def _permit(permissions: Permissions, integration: str) -> None:
    if not permissions.may_use_integration(integration):
        raise Forbidden(
            f"This user token's permissions do not grant the {integration} integration.",
            code="INTEGRATION_FORBIDDEN",
        )


def _warnings(warnings: list[Violation]) -> dict[str, Any]:
    """What the mapping dropped or rewrote, by path (never a value); nothing when all is well."""
    if not warnings:
        return {}
    return {"warnings": [{"path": w.path, "message": w.message} for w in warnings]}


async def _within(future: asyncio.Future[Any], seconds: float) -> bool:
    """Whether `future` is done within `seconds`; unlike asyncio.wait_for it is never
    cancelled, and it costs a third of asyncio.wait on every call (one timer, one waiter)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    timer = loop.call_later(seconds, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
    return future.done()


def _not_json() -> InvalidParameters:
    return InvalidParameters([Violation("parameters", "cannot be sent as JSON")])


def _observed(future: asyncio.Future[Any]) -> None:
    """Retrieves an outcome no one waits for any more (asyncio reports unretrieved errors)."""
    if not future.cancelled():
        future.exception()
