"""Who may use the console: one admin token, sessions kept in memory, CSRF tokens and a bound
on failed logins.

    GET /console/login -> form --POST token--> SHA-256, compared in constant time
        -> a random session id in a cookie (HttpOnly, SameSite=Strict, Path=/console,
           Secure over https); the session, server-side, holds its expiry and a CSRF token
    every page: cookie -> a live session, else the login page
    every POST: + the session's CSRF token in the form, + Origin (or Referer) naming this host

- The token: the config's `[console] token_sha256`, else the file `console.token` beside the
  database (0600), which `funnelgate console-token` writes. Only its SHA-256 is kept anywhere.
  The file is read again when it changes; a new token ends every session made with the old.
- CSRF: the synchronizer token pattern, plus the standard-header check of the source origin
  (OWASP CSRF Prevention Cheat Sheet,
  https://cheatsheetseries.owasp.org/cheatsheets/Cross-Site_Request_Forgery_Prevention_Cheat_Sheet.html).
- Failed logins: at most CLIENT_FAILURES per client address in CLIENT_WINDOW seconds, then 429
  until the oldest ages out. Per address only: a bound on everyone's failures would let anyone
  lock the admin out. Counted in memory, bounded; neither the token tried nor the address is
  ever logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request

from server.config import SHA256_HEX, ConsoleSettings, StorageSettings

TOKEN_FILE = "console.token"  # noqa: S105 - a file name; it holds a hash
MAX_TOKEN_CHARS = 256  # a made token is 43; longer input is refused before it is hashed
MAX_SESSIONS = 1000  # past it, a login ends the oldest session
CLIENT_FAILURES, CLIENT_WINDOW = 10, 900.0
MAX_CLIENTS = 10_000  # client addresses remembered for the bound; the oldest go first
COOKIE = "funnelgate_console"
PATH = "/console"


def token_path(storage: StorageSettings) -> Path:
    return storage.database_path.parent / TOKEN_FILE


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 random bits


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_token_file(path: Path, digest: str) -> None:
    """The digest in `path`, 0600 from the start, swapped in whole (a reader never sees half)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(digest + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


class TokenSource:
    """The admin token's digest: the config's, else the file's as it is now (a stat per use,
    read again only when the file changed)."""

    def __init__(self, settings: ConsoleSettings, path: Path) -> None:
        self._configured = settings.token_sha256
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._digest: str | None = None

    def current(self) -> str | None:
        if self._configured is not None:
            return self._configured
        try:
            stat = self.path.stat()
        except OSError:
            self._seen = self._digest = None
            return None
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen != self._seen:
            self._seen, self._digest = seen, self._read()
        return self._digest

    def _read(self) -> str | None:
        try:
            with self.path.open("rb") as file:
                text = file.read(200).decode("ascii").strip().lower()
        except (OSError, UnicodeDecodeError):
            return None
        return text if SHA256_HEX.fullmatch(text) else None

    def matches(self, token: str) -> str | None:
        """The current digest when `token` is the admin token, else None."""
        current = self.current()
        if current is None or not token or len(token) > MAX_TOKEN_CHARS:
            return None
        return current if hmac.compare_digest(token_digest(token), current) else None


@dataclass
class Session:
    csrf: str
    expires_at: float
    token: str  # the digest of the token it logged in with


class Sessions:
    """Live sessions by the SHA-256 of their id (a lookup's timing says nothing of the ids)."""

    def __init__(self, lifetime: float, clock: Callable[[], float]) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, token: str) -> tuple[str, Session]:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session_id = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), now + self.lifetime, token)
        self._sessions[_key(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None, token: str | None) -> Session | None:
        """The live session `session_id` names, made with the current token."""
        if not session_id or len(session_id) > 128:
            return None
        key = _key(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if (
            session.expires_at <= self._clock()
            or token is None
            or not hmac.compare_digest(session.token, token)
        ):
            del self._sessions[key]
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_key(session_id), None)


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


class LoginThrottle:
    """Failed logins per client address, in a sliding window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._clients: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0: now."""
        now = self._clock()
        failures = self._clients.get(client)
        if failures is None:
            return 0.0
        while failures and failures[0] <= now - CLIENT_WINDOW:
            failures.popleft()
        if len(failures) < CLIENT_FAILURES:
            return 0.0
        return failures[0] + CLIENT_WINDOW - now

    def failed(self, client: str) -> None:
        now = self._clock()
        failures = self._clients.pop(client, None) or deque(maxlen=CLIENT_FAILURES)
        failures.append(now)
        self._clients[client] = failures  # now the newest
        while len(self._clients) > MAX_CLIENTS:
            self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._clients.pop(client, None)


def client_of(request: Request) -> str:
    """The address failed logins are counted by (the proxy's view, when uvicorn trusts it)."""
    return request.client.host if request.client else "-"


def same_origin(request: Request, expected: str | None) -> bool:
    """Whether the request's Origin (else its Referer) names this console; true when neither
    header came (the CSRF token still decides). Without `expected`, the host and port must be
    the request's own Host: a TLS-terminating proxy may hide the scheme, never the host."""
    source = request.headers.get("origin")
    if source is None:
        referer = request.headers.get("referer")
        if referer is None:
            return True
        try:
            parts = urlsplit(referer)
        except ValueError:  # e.g. a malformed IPv6 host
            return False
        source = f"{parts.scheme}://{parts.netloc}"
    source = source.strip().lower()
    if expected is not None:
        return hmac.compare_digest(source.encode(), expected.encode())
    host = request.headers.get("host", "").strip().lower()
    scheme, found, netloc = source.partition("://")
    return bool(found and scheme and host) and hmac.compare_digest(netloc.encode(), host.encode())


def csrf_matches(session: Session, submitted: str | None) -> bool:
    return submitted is not None and hmac.compare_digest(submitted.encode(), session.csrf.encode())
