"""`Idempotency-Key` on Run Tool (IETF draft-ietf-httpapi-idempotency-key-header,
https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/).

A caller that sends a key may retry the call as often as it likes: within 24 h, the same key
with the same request gets the first call's answer again (status, body, content type,
`Location`, `Preference-Applied`, plus `Idempotent-Replayed: true`); the same key with another
request is refused with 422 `IDEMPOTENCY_KEY_REUSED`; a retry while the first call still runs
gets 409 `IDEMPOTENCY_IN_PROGRESS` with `Retry-After` (the draft's "Error Scenarios").

Keys are scoped to (project, user = the token's `sub`): another user's same key is another
key. A request is identified by its fingerprint, SHA-256 over the tool name and the parsed
parameters with sorted keys, so whitespace and key order do not matter.

What is stored: final answers only, 2xx, and 4xx refusals from Meta (`UpstreamError`: the call
reached Meta, whose verdict on those events will not change). funnelgate's own refusals before
anything is sent (invalid parameters, unknown tool, no credential) and 5xx answers are not
stored: nothing happened, so a retry (corrected, or after `funnelgate credentials set`) runs
again. A call interrupted before its answer was stored (a crash, a 5xx, a cancelled request)
also runs again, and is still safe: while a key is given, the call's event ids are derived
from (project, user, key, fingerprint, n-th id), so the re-run sends the same event_ids and
Meta deduplicates on event_id + event_name
(https://developers.facebook.com/docs/marketing-api/conversions-api/deduplicate-pixel-and-server-events).

Rows live in the table `idempotency` of the server's database, written through the
group-commit writer; the key is stored as its SHA-256, never as sent (a caller may put
anything in it). "In progress" is a row too (status 0, claimed in the write transaction
before the call runs), so a retry that reaches another worker or instance meets it; a call
that ends with nothing to keep removes it, and one left by an instance that died mid-call is
taken over after RUNNING_SECONDS (its re-run is safe).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import orjson
from starlette.responses import Response

from server.errors import (
    BadRequest,
    FunnelgateError,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InvalidParameters,
    StorageUnavailable,
    UpstreamError,
)
from server.logs import log
from server.responses import error_response
from server.storage.database import ERRORS, Connection
from server.storage.idempotency import RUNNING, Stored, claim, release, save
from tools.base import Violation

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"  # as Stripe names it
MAX_KEY_CHARS = 255
MAX_STORED_BODY_BYTES = 1024 * 1024  # Run Tool's answers are far smaller; past it, not kept
KEPT_HEADERS = ("location", "preference-applied")  # replayed with the body; names lowercase
# The namespace of derived event ids (RFC 9562 §5.5): uuid5(funnelgate's URL namespace).
EVENT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://funnelgate.invalid/idempotency")

T = TypeVar("T")


class Store(Protocol):
    """The server's `Outbox` (storage/outbox.py): writes through the shared group-commit
    writer, reads on its own connection."""

    async def write(self, job: Callable[[Connection], T]) -> T: ...

    async def read(self, job: Callable[[Connection], T]) -> T: ...


# --- the key and the request: pure --------------------------------------------------------


def parse_key(values: Sequence[str]) -> str | None:
    """The key of the request's `Idempotency-Key` field lines; None when there is none.

    The draft makes the field an RFC 8941 String (`"8e03978e-..."`, §3.3.3, with `\\"` and
    `\\\\` escapes); a bare value is accepted too, as many clients send one. funnelgate's key
    format (the draft asks the server to publish one): 1 to 255 visible ASCII characters.
    """
    if not values:
        return None
    if len(values) > 1:  # the draft: clients MUST NOT send more than one
        raise _bad_key("Send one Idempotency-Key header, not several.")
    value = values[0].strip(" \t")
    key = _sf_string(value) if value.startswith('"') else _bare(value)
    if not key:
        raise _bad_key("The Idempotency-Key is empty.")
    if len(key) > MAX_KEY_CHARS:
        raise _bad_key(f"The Idempotency-Key is longer than {MAX_KEY_CHARS} characters.")
    if not all("!" <= ch <= "~" for ch in key):
        raise _bad_key(
            "The Idempotency-Key may hold only visible ASCII characters (no spaces), "
            'e.g. Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324".'
        )
    return key


def _sf_string(value: str) -> str:
    """RFC 8941 §4.2.5: a quoted string, nothing after it (the value is bounded by the
    server's header size limit)."""
    chars: list[str] = []
    escaped = False
    for i, ch in enumerate(value[1:], start=1):
        if escaped:
            if ch not in '"\\':
                raise _bad_key('In a quoted Idempotency-Key, "\\" may only escape " or \\.')
            chars.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            if i + 1 != len(value):
                raise _bad_key("The Idempotency-Key must be one quoted string, nothing after it.")
            return "".join(chars)
        else:
            chars.append(ch)
    raise _bad_key("The Idempotency-Key's quoted string has no closing quote.")


def _bare(value: str) -> str:
    if any(ch in value for ch in '"\\,'):
        raise _bad_key(
            'Send the Idempotency-Key as one quoted string, e.g. Idempotency-Key: "order-1001".'
        )
    return value


def _bad_key(message: str) -> BadRequest:
    return BadRequest(message, code="INVALID_REQUEST")


def fingerprint(tool_name: str, parameters: Any, credential: str | None = None) -> str:
    """SHA-256 (hex) of the tool name, the parameters as canonical JSON (keys sorted at every
    level), so a retry that re-serialises its body differently is still the same, and the
    credential X-Paragon-Credential names (another account is another request)."""
    request = [tool_name, parameters] if credential is None else [tool_name, parameters, credential]
    try:
        canonical = orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # too deep, or a lone surrogate: the runner refuses it too
        raise InvalidParameters([Violation("parameters", "cannot be sent as JSON")]) from None
    return hashlib.sha256(canonical).hexdigest()


def derived_ids(project_id: str, user_id: str, key: str, fingerprint: str) -> Callable[[], str]:
    """A call's `new_id`: the n-th id it asks for is uuid5 over (project, user, key,
    fingerprint, n), as hex like the random ones. A re-run of the same request makes the same
    ids; the fingerprint keeps a key reused for another request after 24 h from re-using the
    old request's ids (Meta would drop those events as duplicates for 48 h)."""
    scope = [project_id, user_id, key, fingerprint]
    numbers = itertools.count()

    def new_id() -> str:
        name = orjson.dumps([*scope, next(numbers)]).decode()
        return uuid.uuid5(EVENT_ID_NAMESPACE, name).hex

    return new_id


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --- the server's side ------------------------------------------------------------------


Call = Callable[[Callable[[], str]], Awaitable[Response]]


class Idempotency:
    def __init__(self, store: Store, *, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        # (project, user, key hash) -> fingerprint of the call running with that key
        self._running: dict[tuple[str, str, str], str] = {}

    async def handle(
        self,
        project_id: str,
        user_id: str,
        key: str,
        *,
        tool_name: str,
        parameters: Any,
        call: Call,
        credential: str | None = None,
    ) -> Response:
        """`call(new_id)`'s answer, or the stored answer of the first call with `key`.

        `call` runs the tool with `new_id` as its event-id factory and returns the Response
        (or raises a FunnelgateError, which is re-raised once recorded)."""
        fp = fingerprint(tool_name, parameters, credential)
        scope = (project_id, user_id, _key_hash(key))
        running = self._running.get(scope)
        if running is not None:
            raise IdempotencyInProgress if running == fp else IdempotencyKeyReused
        now = self._clock()
        # Marked here before the claim's await: a second call meanwhile meets this one. The
        # claim marks the key in the database, where every instance meets it.
        self._running[scope] = fp
        kept = False
        try:
            try:
                stored = await self._store.write(lambda db: claim(db, *scope, fp, now=now))
            except ERRORS as exc:
                log("idempotency_unavailable", logging.ERROR, error=type(exc).__name__)
                raise StorageUnavailable(reading=True) from None
            if stored is not None:
                kept = True  # not this call's row: left as it is
                if stored.fingerprint != fp:
                    raise IdempotencyKeyReused
                if stored.status == RUNNING:
                    raise IdempotencyInProgress
                return _replay(stored)
            try:
                response = await call(derived_ids(project_id, user_id, key, fp))
            except FunnelgateError as exc:
                if isinstance(exc, UpstreamError) and 400 <= exc.status < 500:
                    kept = await self._keep(scope, fp, error_response(exc))
                raise
            if 200 <= response.status_code < 300 or 400 <= response.status_code < 500:
                kept = await self._keep(scope, fp, response)
            return response
        finally:
            del self._running[scope]
            if not kept:  # nothing to replay: a retry runs again
                with contextlib.suppress(*ERRORS):
                    await self._store.write(lambda db: release(db, *scope))

    async def _keep(self, scope: tuple[str, str, str], fp: str, response: Response) -> bool:
        """Whether the answer was stored (in place of the key's running mark)."""
        body = getattr(response, "body", None)  # a streamed answer has none: not kept
        if not isinstance(body, bytes) or len(body) > MAX_STORED_BODY_BYTES:
            return False
        headers = {
            name: response.headers[name] for name in KEPT_HEADERS if name in response.headers
        }
        stored = Stored(
            fp,
            response.status_code,
            response.headers.get("content-type"),
            headers,
            body,
            self._clock(),
        )
        try:
            await self._store.write(lambda db: save(db, *scope, stored))
        except ERRORS as exc:
            # The call's effect stands and its answer goes out; a retry re-runs it with the
            # same event ids, which Meta deduplicates.
            log("idempotency_not_stored", logging.WARNING, error=type(exc).__name__)
            return False
        return True


def _replay(stored: Stored) -> Response:
    response = Response(stored.body, status_code=stored.status)
    if stored.content_type is not None:
        response.headers["content-type"] = stored.content_type
    response.headers.update(stored.headers)
    response.headers[REPLAYED_HEADER] = "true"
    return response
