"""Paragon User Token verification: the Bearer JWT that names the connected user.

The algorithm comes from the project's key type (RS256 for RSA, ES256 for P-256), never from
the token header, so `alg: none` and HS256-signed-with-the-public-key tokens cannot pass.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any, NamedTuple

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import Project
from server.errors import Unauthorized
from server.permissions import Permissions

MAX_TOKEN_BYTES = 8192
LEEWAY_SECONDS = 30


def bearer_token(authorization: str | None) -> str:
    """The token from an `Authorization: Bearer ...` header; never echoes the header."""
    if not authorization:
        raise Unauthorized(
            "Missing Authorization header: send 'Authorization: Bearer <user token>'."
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header must be 'Bearer <user token>'.")
    return token.strip()


class Verified(NamedTuple):
    """What a valid token says: the connected user, and what it may use."""

    user_id: str
    permissions: Permissions


class VerifiedTokens:
    """Remembers tokens that passed full verification, so a user token sent again costs a
    dict lookup instead of a signature check (~60 µs for RS256).

    Keyed by (project, token): a changed byte is a different key. A hit counts only until the
    token's `exp` (with the same leeway) passes, after which the full check runs again and
    refuses it. Bounded: the oldest entry goes first. Failures are never remembered.
    """

    def __init__(self, clock: Callable[[], float], max_entries: int = 10_000) -> None:
        self._entries: dict[tuple[str, str], tuple[Verified, float]] = {}
        self._max_entries = max_entries
        self._clock = clock

    def verify(self, token: str, project: Project) -> str:
        """The token's `sub` (the connected user) after full verification; raises Unauthorized."""
        return self.caller(token, project).user_id

    def caller(self, token: str, project: Project) -> Verified:
        """The token's user and permissions after full verification; raises Unauthorized."""
        key = (project.id, token)
        now = self._clock()
        hit = self._entries.get(key)
        if hit is not None:
            if now <= hit[1] + LEEWAY_SECONDS:
                return hit[0]
            del self._entries[key]
        verified, expires = _verify(token, project, now)
        if len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (verified, expires)
        return verified


def _verify(token: str, project: Project, now: float) -> tuple[Verified, float]:
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthorized("User token is too large.")
    algorithm = "RS256" if isinstance(project.public_key, rsa.RSAPublicKey) else "ES256"
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            project.public_key,
            algorithms=[algorithm],
            # Times are checked below, against the injected clock and as RFC 7519 NumericDates.
            options={
                "require": ["sub", "iat", "exp"],
                "verify_aud": False,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthorized(f"User token lacks the required '{exc.claim}' claim.") from None
    except jwt.InvalidTokenError:
        raise Unauthorized("User token is invalid for this project.") from None
    expires = _numeric_date(claims, "exp")
    if now > expires + LEEWAY_SECONDS:
        raise Unauthorized("User token has expired.")
    for name in ("iat", "nbf"):
        if name in claims and _numeric_date(claims, name) > now + LEEWAY_SECONDS:
            raise Unauthorized("User token is not valid yet.")
    _check_audience(claims.get("aud"), project.id)
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise Unauthorized("User token 'sub' must be a non-empty string.")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in sub):
        # Stored as text (PostgreSQL refuses U+0000) and written to logs: neither takes these.
        raise Unauthorized("User token 'sub' holds a control character or an unpaired surrogate.")
    return Verified(sub, Permissions.of_claims(claims)), expires


# 2**53: beyond it a JSON number is no longer an exact second (RFC 7493), centuries past use.
_MAX_NUMERIC_DATE = float(2**53)


def _numeric_date(claims: dict[str, Any], name: str) -> float:
    """An RFC 7519 NumericDate: a JSON number of seconds (a string or boolean is refused)."""
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthorized(f"User token '{name}' must be a number of seconds (NumericDate).")
    if not -_MAX_NUMERIC_DATE <= value <= _MAX_NUMERIC_DATE:  # also refuses NaN
        raise Unauthorized(f"User token '{name}' is out of range.")
    return float(value)


def _check_audience(aud: Any, project_id: str) -> None:
    """`aud` is optional in Paragon tokens; when present it must name this project."""
    if aud is None:
        return
    expected = f"useparagon.com/{project_id}"
    accepted = aud == expected or (isinstance(aud, list) and expected in aud)
    if not accepted:
        raise Unauthorized("User token audience does not match this project.")
