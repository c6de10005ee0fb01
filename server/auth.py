"""Paragon User Token verification: the Bearer JWT that names the connected user.

The algorithm comes from the project's key type (RS256 for RSA, ES256 for P-256), never from
the token header, so `alg: none` and HS256-signed-with-the-public-key tokens cannot pass.
"""

from __future__ import annotations

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


def verify_user_token(token: str, project: Project) -> str:
    """The token's `sub` (the connected user) after full verification; raises Unauthorized."""
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
    return sub


def _check_audience(aud: Any, project_id: str) -> None:
    """`aud` is optional in Paragon tokens; when present it must name this project."""
    if aud is None:
        return
    expected = f"useparagon.com/{project_id}"
    accepted = aud == expected or (isinstance(aud, list) and expected in aud)
    if not accepted:
        raise Unauthorized("User token audience does not match this project.")
