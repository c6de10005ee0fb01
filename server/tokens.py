"""Minting Paragon-style user tokens, for testing and curl: what a customer's backend does."""

from __future__ import annotations

import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from server.errors import ConfigError


def mint_user_token(
    private_key_pem: bytes,
    project_id: str,
    user_id: str,
    *,
    ttl_seconds: int = 3600,
    now: float | None = None,
) -> str:
    """An RS256 (RSA key) or ES256 (P-256 key) JWT with sub, iat, exp and the Paragon aud."""
    if ttl_seconds <= 0:  # a token that is born expired only ever answers 401
        raise ConfigError(
            f"the token lifetime must be a positive number of seconds (got {ttl_seconds})"
        )
    try:
        key = load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError("the private key file is not an unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm = "RS256"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = "ES256"
    else:
        raise ConfigError("the private key must be RSA or EC (P-256)")
    issued = int(time.time() if now is None else now)
    claims = {
        "sub": user_id,
        "aud": f"useparagon.com/{project_id}",
        "iat": issued,
        "exp": issued + ttl_seconds,
    }
    return jwt.encode(claims, key, algorithm=algorithm)
