"""Sealing stored access tokens: AES-256-GCM under secret keys the operator holds.

AES-GCM (`cryptography`'s AESGCM) rather than Fernet/MultiFernet, for two reasons:
- associated data: each sealed token is bound to its (project, user) row, so a token copied
  into another user's row fails to open instead of sending events as that user (Fernet has no
  associated data);
- an explicit key id beside each sealed token: start-up checks that every id in use belongs to a
  configured key and names the one that is missing (MultiFernet only tries each key in turn).

A key is 32 random bytes written in base64; its id is derived from it (a truncated SHA-256 with
a label), so a key and its id can never disagree and the id reveals nothing of the key.
Nonces are 96 random bits per seal (NIST SP 800-38D sections 8.2.2 and 8.3: at most 2^32 seals
per key, far beyond any credential table).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import ConfigError

KEY_BYTES = 32
NONCE_BYTES = 12
MAX_KEY_FILE_BYTES = 64 * 1024
ENV_VAR = "FUNNELGATE_SECRET_KEY"
NO_KEY_HINT = (
    f"set {ENV_VAR} or [storage] secret_key_file "
    "(`funnelgate credentials new-key --key-file F` makes a key)"
)
KEY_FILE_HEADER = """\
# funnelgate secret keys: they encrypt the access tokens stored by `funnelgate credentials set`.
# The first key encrypts, every key listed decrypts. To rotate: `funnelgate credentials new-key`,
# then `funnelgate credentials rotate-key`, then delete the old key's line.
"""


class SecretKeyError(ConfigError):
    """A stored token the configured keys cannot open: start-up refuses to serve with it."""


@dataclass(frozen=True)
class SecretKey:
    id: str
    material: bytes = field(repr=False)


def key_id(material: bytes) -> str:
    return hashlib.sha256(b"funnelgate secret key id\0" + material).hexdigest()[:16]


def new_secret_key() -> str:
    """A fresh key in the form key files and FUNNELGATE_SECRET_KEY hold."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).rstrip(b"=").decode()


def parse_secret_keys(text: str, origin: str) -> tuple[SecretKey, ...]:
    """Keys newest first, separated by commas, spaces or lines; `#` starts a comment.

    Messages name the entry's position, never its text.
    """
    keys: dict[str, SecretKey] = {}
    entries = (
        word
        for line in text.splitlines()
        for word in line.split("#", 1)[0].replace(",", " ").split()
    )
    for number, word in enumerate(entries, 1):
        material = _decode(word)
        if material is None:
            raise ConfigError(
                f"{origin}: key {number} is not {KEY_BYTES} bytes in base64 "
                "(`funnelgate credentials new-key --key-file F` makes one)"
            )
        keys.setdefault(key_id(material), SecretKey(key_id(material), material))
    if not keys:
        raise ConfigError(f"{origin}: holds no key")
    return tuple(keys.values())


def add_secret_key(path: Path) -> SecretKey:
    """Put a fresh key first in a key file (created 0600 if absent); the file is replaced whole,
    so a reader never sees half of it."""
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else KEY_FILE_HEADER
        lines = text.splitlines(keepends=True)
        first_key = next(
            (i for i, line in enumerate(lines) if line.split("#", 1)[0].strip()), len(lines)
        )
        key = new_secret_key()
        lines.insert(first_key, key + "\n")
        temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write("".join(lines))
        os.replace(temporary, path)
    except OSError as exc:
        raise ConfigError(f"cannot write the key file {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the key file {path} is not UTF-8 text") from None
    return parse_secret_keys(key, "the new key")[0]


def read_secret_key_file(path: Path) -> tuple[SecretKey, ...]:
    origin = f"secret_key_file {path}"
    try:
        with path.open("rb") as file:
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {origin} ({exc.strerror})") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{origin}: larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{origin}: not UTF-8 text") from None
    return parse_secret_keys(text, origin)


def _decode(word: str) -> bytes | None:
    """Standard or URL-safe base64, padding optional."""
    normal = word.replace("-", "+").replace("_", "/")
    try:
        material = base64.b64decode(normal + "=" * (-len(normal) % 4), validate=True)
    except binascii.Error:
        return None
    return material if len(material) == KEY_BYTES else None


class Keyring:
    """Seals with the first (newest) key; opens with whichever key a token names.

    `reload_from`: the key file to read again when a stored token names a key added to it
    since start-up, so a running server follows a rotation without a restart.
    """

    def __init__(
        self, keys: Sequence[SecretKey], *, reload_from: Path | None = None, origin: str = ""
    ) -> None:
        self._reload_from = reload_from
        self.origin = origin or "no secret key is configured"
        self._use(keys)

    def _use(self, keys: Sequence[SecretKey]) -> None:
        self._keys = tuple(keys)
        self._ciphers = {key.id: AESGCM(key.material) for key in keys}
        self.current_id = keys[0].id if keys else None

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._ciphers)

    def seal(self, plaintext: bytes, context: bytes) -> tuple[str, bytes]:
        if self.current_id is None:
            raise ConfigError(
                f"no secret key is configured to encrypt access tokens: {NO_KEY_HINT}"
            )
        nonce = os.urandom(NONCE_BYTES)
        return self.current_id, nonce + self._ciphers[self.current_id].encrypt(
            nonce, plaintext, context
        )

    def open(self, key_id: str, sealed: bytes, context: bytes) -> bytes:
        cipher = self._ciphers.get(key_id) or self._reloaded(key_id)
        try:
            return cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context)
        except InvalidTag:
            raise SecretKeyError(
                f"an access token sealed with secret key {key_id} fails authentication: "
                "the database was altered or damaged"
            ) from None

    def _reloaded(self, key_id: str) -> AESGCM:
        if self._reload_from is not None:
            # The file's keys first; keys it no longer lists stay, as tokens may still use them.
            from_file = read_secret_key_file(self._reload_from)
            known = {key.id for key in from_file}
            self._use([*from_file, *(key for key in self._keys if key.id not in known)])
            if key_id in self._ciphers:
                return self._ciphers[key_id]
        configured = ", ".join(self._ciphers) or "none"
        raise SecretKeyError(
            f"stored access tokens use secret key {key_id}, which is not configured "
            f"({self.origin}; key ids: {configured}): {NO_KEY_HINT}"
        )
