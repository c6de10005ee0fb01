"""The offline first run: `funnelgate serve` with no config builds ./.funnelgate/ and uses it.

A dev project with its own RSA key pair, a SQLite database and the sandbox Graph: it works
with no Meta account and no network. Created once, reused on later runs.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from server.tokens import mint_user_token

DEV_DIR = Path(".funnelgate")
DEV_USER = "dev-user"
DEV_PIXEL = "1234567890"
PRIVATE_KEY = "keys/project.pem"
PUBLIC_KEY = "keys/project.pub.pem"

_CONFIG = """\
# funnelgate dev setup, made by `funnelgate serve` with no config. Safe to delete.
[graph]
sandbox = true   # deliver to the built-in sandbox Graph: nothing leaves this machine

[storage]
url = "sqlite:///funnelgate.db"

[[projects]]
id = "{project_id}"
jwt_public_key_file = "{public_key}"
facebook_access_token = "sandbox-access-token"
"""


def ensure_dev_setup(root: Path = DEV_DIR) -> Path:
    """The dev config file, creating the directory, keys and config on first use."""
    config_path = root / "config.toml"
    if config_path.exists():
        return config_path
    (root / "keys").mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = root / PRIVATE_KEY
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    (root / PUBLIC_KEY).write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config_path.write_text(_CONFIG.format(project_id=uuid.uuid4(), public_key=PUBLIC_KEY))
    return config_path


def try_it(root: Path, project_id: str, base_url: str) -> str:
    """A ready-to-paste curl that sends a Purchase to the sandbox, with a fresh 24 h token."""
    token = mint_user_token(
        (root / PRIVATE_KEY).read_bytes(), project_id, DEV_USER, ttl_seconds=86400
    )
    return f"""\
curl -sS -X POST {base_url}/projects/{project_id}/tools \\
  -H 'Authorization: Bearer {token}' \\
  -H 'Content-Type: application/json' \\
  -d '{{"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": {{
        "pixel": "{DEV_PIXEL}", "eventName": "Purchase", "actionSource": "website",
        "eventSourceUrl": "https://shop.example.com/checkout/done",
        "customerClientUserAgent": "Mozilla/5.0 (X11; Linux x86_64)",
        "customerEmail": "Joe@Example.com", "contentId": "ABC123,XYZ789"}}}}'"""
