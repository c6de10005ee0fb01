"""Setups made for the user: the offline first run and `funnelgate init`.

Both write the same files: a project RSA key pair (private key 0600), a secret key file that
encrypts stored access tokens (0600) and a commented config.toml (0600: it is where secrets go).
- `funnelgate serve` with no config builds ./.funnelgate/ once and reuses it: the sandbox Graph,
  so it works with no Meta account and no network.
- `funnelgate init [DIR]` writes a starter config for real use, and never overwrites a file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from server.errors import ConfigError
from server.storage.crypto import add_secret_key
from server.tokens import mint_user_token

DEV_DIR = Path(".funnelgate")
DEV_USER = "dev-user"
DEV_PIXEL = "1234567890"
CONFIG = "config.toml"
PRIVATE_KEY = "keys/project.pem"
PUBLIC_KEY = "keys/project.pub.pem"
KEY_FILE = "secret.key"

_DEV_CONFIG = """\
# funnelgate dev setup, made by `funnelgate serve` with no config. Safe to delete.
[graph]
sandbox = true   # deliver to the built-in sandbox Graph: nothing leaves this machine

[storage]
url = "sqlite:///funnelgate.db"
secret_key_file = "{secret_key}"

[[projects]]
id = "{project_id}"
jwt_public_key_file = "{public_key}"
facebook_access_token = "sandbox-access-token"
"""

_STARTER_CONFIG = """\
# funnelgate config, made by `funnelgate init`. Every key is in the README's Configuration table.
# Serve it: funnelgate serve --config {config}

[graph]
api_version = "v24.0"
# sandbox = true   # try it offline first: the built-in sandbox Graph, nothing reaches Meta

[storage]
url = "sqlite:///funnelgate.db"       # per-user access tokens, encrypted with the key below
secret_key_file = "{secret_key}"        # or FUNNELGATE_SECRET_KEY

[server]
max_in_flight = 1024                  # calls processed at once; past it, 503 OVERLOADED
# trusted_proxies = ["10.0.0.0/8"]    # proxies whose X-Forwarded-For/-Proto are believed
shutdown_seconds = 10                 # time in-flight calls get to finish on SIGTERM

[[projects]]
id = "{project_id}"
jwt_public_key_file = "{public_key}"  # user tokens are signed with {private_key}
# A project-wide Meta access token (system user), used for users without their own
# (`funnelgate credentials set`). From a file, the environment, or inline; one of:
# facebook_access_token_file = "meta-token.txt"
# facebook_access_token_env = "META_ACCESS_TOKEN"
# facebook_access_token = "EAAB..."
# facebook_app_secret_file = "meta-app-secret.txt"   # optional: adds appsecret_proof
# default_phone_region = "US"
"""


def ensure_dev_setup(root: Path = DEV_DIR) -> Path:
    """The dev config file, creating the directory, keys and config on first use."""
    config_path = root / CONFIG
    if not config_path.exists():  # a setup cut short (no config yet) is made again
        _write_setup(root, _DEV_CONFIG, overwrite=True)
    return config_path


def init_setup(root: Path) -> str:
    """`funnelgate init`: the starter files in `root`; the new project's id."""
    taken = [root / name for name in (CONFIG, PRIVATE_KEY, PUBLIC_KEY, KEY_FILE)]
    if existing := [path for path in taken if path.exists()]:
        raise ConfigError(f"{existing[0]} already exists: init never overwrites a file")
    return _write_setup(root, _STARTER_CONFIG, overwrite=False)


def _write_setup(root: Path, template: str, *, overwrite: bool) -> str:
    project_id = str(uuid.uuid4())
    (root / "keys").mkdir(mode=0o700, parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(root / PRIVATE_KEY, private, 0o600, overwrite=overwrite)
    _write(root / PUBLIC_KEY, public, 0o644, overwrite=overwrite)
    if overwrite:
        (root / KEY_FILE).unlink(missing_ok=True)
    add_secret_key(root / KEY_FILE)
    text = template.format(
        project_id=project_id, public_key=PUBLIC_KEY, private_key=PRIVATE_KEY,
        secret_key=KEY_FILE, config=root / CONFIG,
    )  # fmt: skip
    _write(root / CONFIG, text.encode(), 0o600, overwrite=overwrite)  # written last: the marker
    return project_id


def _write(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """The file has `mode` from its creation on: no moment where others could read it."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        descriptor = os.open(path, flags, mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists: init never overwrites a file") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path} ({exc.strerror})") from None
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), mode)  # an existing file keeps its mode otherwise
        file.write(data)


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
