"""The TOML configuration: loaded once at start-up into frozen settings.

Every problem becomes one `ConfigError` line that names the file, the key and what is wrong.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import phonenumbers
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from server.errors import ConfigError

DEFAULT_GRAPH_BASE_URL = "https://graph.facebook.com"
# The one place the Graph API version is pinned; versions are supported for at least two years.
DEFAULT_GRAPH_API_VERSION = "v24.0"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class GraphSettings:
    base_url: str = DEFAULT_GRAPH_BASE_URL
    api_version: str = DEFAULT_GRAPH_API_VERSION
    timeout_seconds: float = 1.5  # per attempt, Meta's advice
    retry_deadline_seconds: float = 10.0  # all attempts together; callers time out at ~10 s
    max_connections: int = 100
    # Calls for the same pixel and credentials in one event-loop turn share a Graph request.
    coalesce: bool = True
    # Deliver to the built-in sandbox Graph instead of base_url (dev setup, demos).
    sandbox: bool = False


@dataclass(frozen=True)
class Project:
    id: str
    public_key: PublicKey = field(repr=False)
    facebook_access_token: str | None = field(default=None, repr=False)
    facebook_app_secret: str | None = field(default=None, repr=False)
    default_phone_region: str | None = None  # ISO alpha-2: national phone numbers' country
    test_event_code: str | None = None  # sends every event to Meta's Test Events tool


@dataclass(frozen=True)
class Config:
    graph: GraphSettings
    database_path: Path
    projects: dict[str, Project]
    source: Path | None = None


def load_config(path: Path, env: dict[str, str] | None = None) -> Config:
    """Read and check a config file; `env` supplies FUNNELGATE_GRAPH_BASE_URL overrides."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML ({exc})") from None
    return parse_config(raw, base_dir=path.resolve().parent, source=path, env=env or {})


def parse_config(
    raw: dict[str, Any], *, base_dir: Path, source: Path | None = None, env: dict[str, str]
) -> Config:
    where = f"config {source}" if source else "config"
    graph = _graph(_table(raw, "graph", where), where)
    if url := env.get("FUNNELGATE_GRAPH_BASE_URL"):
        graph = GraphSettings(**{**graph.__dict__, "base_url": url.rstrip("/")})
    storage = _table(raw, "storage", where)
    database = _sqlite_path(_str(storage, "url", where, "sqlite:///funnelgate.db"), base_dir, where)
    projects_raw = raw.get("projects", [])
    if not isinstance(projects_raw, list) or not projects_raw:
        raise ConfigError(f"{where}: at least one [[projects]] table is required")
    projects: dict[str, Project] = {}
    for index, item in enumerate(projects_raw):
        project = _project(item, base_dir, f"{where}: projects[{index}]")
        if project.id in projects:
            raise ConfigError(f"{where}: project id {project.id!r} appears twice")
        projects[project.id] = project
    return Config(graph=graph, database_path=database, projects=projects, source=source)


def _table(raw: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return value


def _str(table: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value


def _graph(table: dict[str, Any], where: str) -> GraphSettings:
    defaults = GraphSettings()
    known = set(defaults.__dict__)
    if unknown := set(table) - known:
        raise ConfigError(f"{where}: unknown key(s) in [graph]: {', '.join(sorted(unknown))}")
    for key in ("timeout_seconds", "retry_deadline_seconds"):
        value = table.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where}: graph.{key} must be a positive number")
    for key in ("sandbox", "coalesce"):
        if not isinstance(table.get(key, False), bool):
            raise ConfigError(f"{where}: graph.{key} must be true or false")
    if "max_connections" in table and (
        not isinstance(table["max_connections"], int) or table["max_connections"] < 1
    ):
        raise ConfigError(f"{where}: graph.max_connections must be a positive integer")
    base_url = _str(table, "base_url", where, defaults.base_url).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: graph.base_url must start with http:// or https://")
    return GraphSettings(
        base_url=base_url,
        api_version=_str(table, "api_version", where, defaults.api_version),
        timeout_seconds=float(table.get("timeout_seconds", defaults.timeout_seconds)),
        retry_deadline_seconds=float(
            table.get("retry_deadline_seconds", defaults.retry_deadline_seconds)
        ),
        max_connections=int(table.get("max_connections", defaults.max_connections)),
        coalesce=bool(table.get("coalesce", defaults.coalesce)),
        sandbox=bool(table.get("sandbox", False)),
    )


def _sqlite_path(url: str, base_dir: Path, where: str) -> Path:
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigError(f"{where}: storage.url must be sqlite:///PATH (got scheme of {url!r})")
    path = Path(url[len(prefix) :])
    return path if path.is_absolute() else base_dir / path


def _project(item: Any, base_dir: Path, where: str) -> Project:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    project_id = _str(item, "id", where)
    where = f"{where} ({project_id})"
    if "jwt_public_key" in item:
        pem = _str(item, "jwt_public_key", where).encode()
        origin = "jwt_public_key"
    else:
        key_file = base_dir / _str(item, "jwt_public_key_file", where)
        origin = f"jwt_public_key_file {key_file}"
        try:
            pem = key_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {origin} ({exc.strerror})") from None
    try:
        key = load_pem_public_key(pem)
    except ValueError:
        raise ConfigError(f"{where}: {origin} is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(f"{where}: {origin} must be an RSA or EC (P-256) public key")
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{where}: {origin} must use the P-256 curve for ES256")
    optional = ("facebook_access_token", "facebook_app_secret", "default_phone_region",
                "test_event_code")  # fmt: skip
    for name in optional:
        value = item.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where}: {name} must be a non-empty string")
    region = item.get("default_phone_region")
    if region is not None and region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(f"{where}: default_phone_region must be an ISO 3166-1 alpha-2 code")
    return Project(
        id=project_id,
        public_key=key,
        facebook_access_token=item.get("facebook_access_token"),
        facebook_app_secret=item.get("facebook_app_secret"),
        default_phone_region=region.upper() if region else None,
        test_event_code=item.get("test_event_code"),
    )
