"""Who may use the console: one admin token, signed session cookies, CSRF tokens and a bound
on failed logins.

    GET /console/login -> form --POST token--> SHA-256, compared in constant time
        -> a cookie (HttpOnly, SameSite=Strict, Path=/console, Secure over https) holding a
           random session id, its expiry and an HMAC-SHA256 over both
    every page: cookie -> signature, expiry, not logged out -> a session, else the login page
    every POST: + the session's CSRF token in the form, + Origin (or Referer) naming this host

- The token: the config's `[console] token_sha256`, else the file `console.token` beside the
  database (0600), which `funnelgate console-token` writes. Only its SHA-256 is kept anywhere.
  The file is read again when it changes.
- Sessions are kept by nobody: the cookie carries them, signed with a key derived from the
  token's SHA-256 under a label of its own (session_key). Any worker process, and any host
  configured with the same token, opens a session another made; a new token is a new key, so
  it ends every session of the old one. The CSRF token is derived from the session id with
  the same key (OWASP's HMAC-based synchronizer token). The key also takes the storage's
  newest secret key, which every instance holds to open stored tokens: the digest alone (in a
  config file) makes no session. Without a secret key configured, whoever reads the digest
  could make one (never learn the token): it is kept 0600. A new secret key ends sessions.
- Logging out clears the cookie and writes the session id's SHA-256, until the session's own
  expiry, to `console.revoked` beside the token file, which every worker of the host reads
  (again when it changes): a copy of the cookie replayed after a logout is refused there.
  A file rather than memory because a worker's memory is not the next request's worker's; a
  host does not see another host's file, so behind a load balancer a copied cookie stays good
  on the other hosts until its expiry (`[console] session_hours`); a new token ends it there.
- CSRF: the synchronizer token pattern, plus the standard-header check of the source origin
  (OWASP CSRF Prevention Cheat Sheet,
  https://cheatsheetseries.owasp.org/cheatsheets/Cross-Site_Request_Forgery_Prevention_Cheat_Sheet.html).
- Failed logins: at most CLIENT_FAILURES per client address in CLIENT_WINDOW seconds, then 429
  until the oldest ages out. Per address only: a bound on everyone's failures would let anyone
  lock the admin out. Counted in each worker's memory, bounded (N workers allow N times as
  many; a made token has 256 random bits); neither the token tried nor the address is ever
  logged.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import math
import os
import re
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
REVOKED_FILE = "console.revoked"
MAX_TOKEN_CHARS = 256  # a made token is 43; longer input is refused before it is hashed
SESSION_ID_BYTES = 18  # 144 random bits, 24 characters
SESSION_KEY_LABEL = b"funnelgate console session key v1"
_COOKIE_LABEL, _CSRF_LABEL = b"cookie:", b"csrf:"
MAX_COOKIE_CHARS = 128  # a made cookie is 24 + 1 + 10 + 1 + 43
_EXPIRY = re.compile(r"[0-9]{1,12}")
MAX_REVOKED = 10_000
CLIENT_FAILURES, CLIENT_WINDOW = 10, 900.0
MAX_CLIENTS = 10_000  # client addresses remembered for the bound; the oldest go first
COOKIE = "funnelgate_console"
PATH = "/console"


def token_path(storage: StorageSettings) -> Path:
    return storage.database_path.parent / TOKEN_FILE


def revoked_path(storage: StorageSettings) -> Path:
    return storage.database_path.parent / REVOKED_FILE


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


@dataclass(frozen=True)
class Session:
    id: str
    csrf: str
    expires_at: float
    token: str  # the digest of the token it logged in with


class Sessions:
    """Sessions made and checked from their cookie alone (module docstring): nothing of them
    is kept but the revocations of logged-out ones."""

    def __init__(
        self,
        lifetime: float,
        clock: Callable[[], float],
        revoked: Revocations,
        secret: bytes = b"",
    ) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._revoked = revoked
        self._secret = secret  # the storage's newest secret key: the digest alone makes none
        self._keys: tuple[str, bytes] | None = None  # the last (digest, key) derived

    def create(self, token: str) -> tuple[str, Session]:
        """A new session for the token whose digest is `token`: the cookie's value, and it."""
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        expires_at = math.ceil(self._clock() + self.lifetime)
        key = self._key(token)
        cookie = f"{session_id}.{expires_at}.{_mac(key, _COOKIE_LABEL, session_id, expires_at)}"
        return cookie, self._session(key, session_id, expires_at, token)

    def get(self, cookie: str | None, token: str | None) -> Session | None:
        """The live session `cookie` holds, signed with the current token's key."""
        if token is None or (parsed := _parse(cookie)) is None:
            return None
        session_id, expires_at, mac = parsed
        key = self._key(token)
        expected = _mac(key, _COOKIE_LABEL, session_id, expires_at)
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            return None
        if expires_at <= self._clock() or session_id in self._revoked:
            return None
        return self._session(key, session_id, expires_at, token)

    def end(self, session: Session) -> None:
        """Logged out: refused from now on by every worker reading the revocations."""
        self._revoked.add(session.id, session.expires_at)

    def _session(self, key: bytes, session_id: str, expires_at: int, token: str) -> Session:
        return Session(session_id, _mac(key, _CSRF_LABEL, session_id), expires_at, token)

    def _key(self, digest: str) -> bytes:
        if self._keys is None or self._keys[0] != digest:
            self._keys = (digest, session_key(digest, self._secret))
        return self._keys[1]


def session_key(digest: str, secret: bytes = b"") -> bytes:
    """The sessions' signing key: HMAC-SHA256 keyed by the storage's secret key and the
    token's SHA-256, over a label that is this key's alone (domain separation: neither
    signs anything itself). With a secret key configured, which every instance shares to open
    the stored tokens, the digest in a config is not enough to make a session."""
    return hmac.new(secret + bytes.fromhex(digest), SESSION_KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, label: bytes, session_id: str, expires_at: int | None = None) -> str:
    """base64url HMAC-SHA256 over `label`, the id and the expiry (a label per use: a CSRF
    token is never a cookie's signature)."""
    message = label + session_id.encode() + (b"" if expires_at is None else b".%d" % expires_at)
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _parse(cookie: str | None) -> tuple[str, int, str] | None:
    """(session id, expiry, signature) from a cookie of the form `id.expiry.signature`."""
    if not cookie or len(cookie) > MAX_COOKIE_CHARS:
        return None
    parts = cookie.split(".")
    if len(parts) != 3 or not parts[0] or not _EXPIRY.fullmatch(parts[1]):
        return None
    return parts[0], int(parts[1]), parts[2]


class Revocations:
    """Logged-out sessions, as SHA-256 of their ids with their expiries, in a file of their
    own (0600) that every worker on the host reads: a stat per check, read again (under a
    shared lock) only when it changed; written whole under an exclusive lock, without the
    expired ones. Logging out needs a session, so only the admin adds lines; at most
    MAX_REVOKED are kept (the ones expiring first go)."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        self._seen: tuple[int, int, int] | None = None
        self._revoked: dict[str, float] = {}

    def __contains__(self, session_id: str) -> bool:
        try:
            stat = self.path.stat()
        except OSError:
            self._seen, self._revoked = None, {}
            return False
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen != self._seen:
            with (
                contextlib.suppress(OSError),
                self.path.open("r", encoding="ascii", errors="replace") as file,
            ):
                fcntl.flock(file, fcntl.LOCK_SH)
                self._revoked = _entries(file.read())
                self._seen = seen
        expires_at = self._revoked.get(_key(session_id))
        return expires_at is not None and expires_at > self._clock()

    def add(self, session_id: str, expires_at: float) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+", encoding="ascii", errors="replace") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            now = self._clock()
            entries = {k: at for k, at in _entries(file.read()).items() if at > now}
            entries[_key(session_id)] = expires_at
            kept = sorted(entries.items(), key=lambda item: item[1])[-MAX_REVOKED:]
            file.seek(0)
            file.truncate()
            file.write("".join(f"{key} {at:.0f}\n" for key, at in kept))
            file.flush()
            os.fsync(file.fileno())


def _entries(text: str) -> dict[str, float]:
    entries = {}
    for line in text.splitlines():
        key, _, at = line.partition(" ")
        if SHA256_HEX.fullmatch(key) and _EXPIRY.fullmatch(at):
            entries[key] = float(at)
    return entries


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


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
