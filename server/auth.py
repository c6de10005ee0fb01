"""Paragon User Token verification: the Bearer JWT that names the connected user.

The algorithm comes from the project's key type (RS256 for RSA, ES256 for P-256), never from
the token header, so `alg: none` and HS256-signed-with-the-public-key tokens cannot pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import Project
from server.errors import Unauthorized

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


class VerifiedTokens:
    """Remembers tokens that passed full verification, so a user token sent again costs a
    dict lookup instead of a signature check (~60 µs for RS256).

    Keyed by (project, token): a changed byte is a different key. A hit counts only until the
    token's `exp` (with the same leeway) passes, after which the full check runs again and
    refuses it. Bounded: the oldest entry goes first. Failures are never remembered.
    """

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self._entries: dict[tuple[str, str], tuple[str, float]] = {}
        self._max_entries = max_entries
        self._clock = clock

    def verify(self, token: str, project: Project) -> str:
        """The token's `sub`; raises Unauthorized exactly as `verify_user_token` does."""
        key = (project.id, token)
        hit = self._entries.get(key)
        if hit is not None:
            if self._clock() <= hit[1] + LEEWAY_SECONDS:
                return hit[0]
            del self._entries[key]
        sub, expires = _verify(token, project)
        if len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (sub, expires)
        return sub


def verify_user_token(token: str, project: Project) -> str:
    """The token's `sub` (the connected user) after full verification; raises Unauthorized."""
    return _verify(token, project)[0]


def _verify(token: str, project: Project) -> tuple[str, float]:
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthorized("User token is too large.")
    algorithm = "RS256" if isinstance(project.public_key, rsa.RSAPublicKey) else "ES256"
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            project.public_key,
            algorithms=[algorithm],
            leeway=LEEWAY_SECONDS,
            options={"require": ["sub", "iat", "exp"], "verify_aud": False},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("User token has expired.") from None
    except jwt.ImmatureSignatureError:
        raise Unauthorized("User token is not valid yet.") from None
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthorized(f"User token lacks the required '{exc.claim}' claim.") from None
    except jwt.InvalidTokenError:
        raise Unauthorized("User token is invalid for this project.") from None
    _check_audience(claims.get("aud"), project.id)
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise Unauthorized("User token 'sub' must be a non-empty string.")
    return sub, float(claims["exp"])


def _check_audience(aud: Any, project_id: str) -> None:
    """`aud` is optional in Paragon tokens; when present it must name this project."""
    if aud is None:
        return
    expected = f"useparagon.com/{project_id}"
    accepted = aud == expected or (isinstance(aud, list) and expected in aud)
    if not accepted:
        raise Unauthorized("User token audience does not match this project.")
