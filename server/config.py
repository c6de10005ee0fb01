"""The TOML configuration: loaded once at start-up into frozen settings.

Every problem becomes one `ConfigError` line that names the file, the table, the key and what
is wrong. Every table refuses keys it does not know (a misspelt key would otherwise be ignored
in silence), and numbers must be numbers (TOML's `true` is not 1).

Secrets (`facebook_access_token`, `facebook_app_secret`) come from the file itself, from a file
named by `NAME_file` (as container secrets are mounted) or from the environment variable named
by `NAME_env`; one of the three.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import phonenumbers
import psycopg
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from psycopg.conninfo import conninfo_to_dict

from server.errors import ConfigError
from server.storage.crypto import ENV_VAR as SECRET_KEY_ENV
from server.storage.crypto import SecretKey, parse_secret_keys, read_secret_key_file

DEFAULT_GRAPH_BASE_URL = "https://graph.facebook.com"
# The one place the Graph API version is pinned; versions are supported for at least two years.
DEFAULT_GRAPH_API_VERSION = "v24.0"
API_VERSION = re.compile(r"v[0-9]+\.[0-9]+")  # always fullmatch: `$` would allow a final "\n"
MAX_SECRET_FILE_BYTES = 16 * 1024  # Meta's tokens are a few hundred bytes

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class GraphSettings:
    base_url: str = DEFAULT_GRAPH_BASE_URL
    api_version: str = DEFAULT_GRAPH_API_VERSION
    timeout_seconds: float = 1.5  # per attempt at first; it grows while Meta is slow
    max_connections: int = 100
    # Calls for the same pixel and credentials in one event-loop turn share a Graph request.
    coalesce: bool = True
    # Deliver to the built-in sandbox Graph instead of base_url (dev setup, demos).
    sandbox: bool = False


DELIVERY_MODES = ("sync", "queued")


@dataclass(frozen=True)
class DeliverySettings:
    mode: str = "sync"  # or "queued": answer 202 once the event is on disk (README, Delivery)
    # A sync call's time for Meta's answer; past it the event is queued and the call answers
    # 202. Well inside the ~10 s callers allow, leaving room for the queueing and the network.
    sync_budget_seconds: float = 4.0
    max_queued_events: int = 1_000_000  # pending events; past it, 503 QUEUE_FULL
    max_concurrent_requests: int = 8  # the dispatcher's Graph requests in flight


@dataclass(frozen=True)
class StorageSettings:
    database_path: Path
    # Newest first: the first seals, all open. From FUNNELGATE_SECRET_KEY, else secret_key_file.
    secret_keys: tuple[SecretKey, ...] = field(default=(), repr=False)
    # Read again when a stored token names a key added to the file after start-up.
    secret_key_file: Path | None = None
    secret_key_origin: str = ""  # for messages: where the keys came from
    retention_days: float = 7.0  # delivered and failed events are kept this long
    # A PostgreSQL connection URI: the database several instances share (None: the SQLite file).
    url: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """The database, for messages: the file, or PostgreSQL's host and database name (the
        URI may hold a password)."""
        if self.url is None:
            return str(self.database_path)
        info = conninfo_to_dict(self.url)
        return f"postgresql {info.get('host', 'localhost')}/{info.get('dbname', '')}"


@dataclass(frozen=True)
class ServerSettings:
    max_in_flight: int = 1024  # calls being processed at once; past it, 503 OVERLOADED
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (IPs and CIDR networks).
    trusted_proxies: tuple[str, ...] = ()
    shutdown_seconds: float = 10.0  # how long in-flight calls may finish on SIGTERM


# An origin as browsers send it (RFC 6454): scheme, host (a name or a bracketed IPv6), port.
CONSOLE_ORIGIN = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ConsoleSettings:
    """The admin console at /console (README, Console). It is served when a token is set up:
    `token_sha256` here, else the file `funnelgate console-token` writes beside the database."""

    enabled: bool = True  # false: never served, whatever token exists
    # The SHA-256 (hex) of the admin token: the config holds nothing that logs anyone in.
    token_sha256: str | None = field(default=None, repr=False)
    session_hours: float = 12.0  # a login lasts this long, then asks again
    # The console's public origin (https://host[:port]) when a proxy rewrites the Host header;
    # a form's Origin or Referer must match it. Default: the request's own host.
    origin: str | None = None


METRICS_PATH = re.compile(r"/[A-Za-z0-9._~/-]*")  # plain path segments: no route parameters
# Paths the server already answers; the metrics cannot take one of them.
_SERVED_PATHS = ("/healthz", "/readyz", "/openapi.json", "/sandbox/events")
_SERVED_PREFIXES = ("/projects/", "/console")


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True
    path: str = "/metrics"
    # None: /metrics is served by the main server; a port: by a listener of its own on `host`
    # only, since the metrics are rarely meant for the public side of a deployment.
    port: int | None = None
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class Project:
    id: str
    public_key: PublicKey = field(repr=False)
    facebook_access_token: str | None = field(default=None, repr=False)
    facebook_app_secret: str | None = field(default=None, repr=False)
    default_phone_region: str | None = None  # ISO alpha-2: national phone numbers' country
    test_event_code: str | None = None  # sends every event to Meta's Test Events tool
    delivery_mode: str | None = None  # overrides [delivery] mode for this project


@dataclass(frozen=True)
class Config:
    graph: GraphSettings
    storage: StorageSettings
    projects: dict[str, Project]
    server: ServerSettings = field(default_factory=ServerSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: Path | None = None

    def delivery_mode(self, project: Project) -> str:
        return project.delivery_mode or self.delivery.mode


_TOP_LEVEL = ("graph", "storage", "server", "delivery", "metrics", "console", "projects")
_STORAGE_KEYS = ("url", "secret_key_file", "retention_days")
DATABASE_URL_ENV = "FUNNELGATE_DATABASE_URL"  # wins over [storage] url, as env does
DEFAULT_URL = "sqlite:///funnelgate.db"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SECRETS = ("facebook_access_token", "facebook_app_secret")
_PROJECT_KEYS = (
    "id", "jwt_public_key", "jwt_public_key_file", "default_phone_region", "test_event_code",
    "delivery_mode",
    *(f"{name}{suffix}" for name in _SECRETS for suffix in ("", "_file", "_env")),
)  # fmt: skip


def load_config(path: Path, env: dict[str, str] | None = None) -> Config:
    """Read and check a config file; `env` supplies the FUNNELGATE_* overrides and `*_env`."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML ({exc})") from None
    return parse_config(raw, base_dir=path.resolve().parent, source=path, env=env or {})


def parse_config(
    raw: dict[str, Any], *, base_dir: Path, source: Path | None = None, env: dict[str, str]
) -> Config:
    where = f"config {source}" if source else "config"
    _refuse_unknown(raw, _TOP_LEVEL, f"{where}, top level")
    graph = _graph(_table(raw, "graph", where), f"{where}, [graph]")
    if url := env.get("FUNNELGATE_GRAPH_BASE_URL"):
        graph = GraphSettings(**{**graph.__dict__, "base_url": url.rstrip("/")})
    storage = _storage(_table(raw, "storage", where), base_dir, env, f"{where}, [storage]")
    server = _server(_table(raw, "server", where), f"{where}, [server]")
    delivery = _delivery(_table(raw, "delivery", where), f"{where}, [delivery]")
    console = _console(_table(raw, "console", where), f"{where}, [console]")
    metrics = _metrics(_table(raw, "metrics", where), f"{where}, [metrics]")
    projects_raw = raw.get("projects", [])
    if not isinstance(projects_raw, list) or not projects_raw:
        raise ConfigError(f"{where}: at least one [[projects]] table is required")
    projects: dict[str, Project] = {}
    for index, item in enumerate(projects_raw):
        project = _project(item, base_dir, env, f"{where}, [[projects]] #{index + 1}")
        if project.id in projects:
            raise ConfigError(f"{where}: project id {project.id!r} appears twice")
        projects[project.id] = project
    return Config(
        graph=graph,
        storage=storage,
        server=server,
        delivery=delivery,
        console=console,
        metrics=metrics,
        projects=projects,
        source=source,
    )


def _refuse_unknown(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            raise ConfigError(f"{where}: unknown key {key!r} ({hint})")


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


def _number(table: dict[str, Any], key: str, where: str, default: float) -> float:
    """A positive number; TOML's booleans are refused (Python counts them as integers)."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where}: {key} must be a positive number")
    return float(value)


def _count(table: dict[str, Any], key: str, where: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {key} must be a positive integer")
    return value


def _flag(table: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false")
    return value


def _graph(table: dict[str, Any], where: str) -> GraphSettings:
    defaults = GraphSettings()
    _refuse_unknown(table, tuple(defaults.__dict__), where)
    base_url = _str(table, "base_url", where, defaults.base_url).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: base_url must start with http:// or https://")
    api_version = _str(table, "api_version", where, defaults.api_version)
    if not API_VERSION.fullmatch(api_version):
        raise ConfigError(f"{where}: api_version must look like v24.0 (got {api_version!r})")
    return GraphSettings(
        base_url=base_url,
        api_version=api_version,
        timeout_seconds=_number(table, "timeout_seconds", where, defaults.timeout_seconds),
        max_connections=_count(table, "max_connections", where, defaults.max_connections),
        coalesce=_flag(table, "coalesce", where, defaults.coalesce),
        sandbox=_flag(table, "sandbox", where, defaults.sandbox),
    )


def _storage(
    table: dict[str, Any], base_dir: Path, env: dict[str, str], where: str
) -> StorageSettings:
    _refuse_unknown(table, _STORAGE_KEYS, where)
    url = env.get(DATABASE_URL_ENV, "").strip()
    source = DATABASE_URL_ENV if url else where  # what a message about the URL names
    url = url or _str(table, "url", where, DEFAULT_URL)
    database_url = _postgres_url(url, source) if url.startswith(POSTGRES_SCHEMES) else None
    # With PostgreSQL the path is unused but for what lives beside it (console.token).
    database = base_dir / "funnelgate.db" if database_url else _sqlite_path(url, base_dir, source)
    retention = _number(table, "retention_days", where, StorageSettings.retention_days)
    if from_env := env.get(SECRET_KEY_ENV, "").strip():  # wins over the file, as env does
        keys = parse_secret_keys(from_env, SECRET_KEY_ENV)
        return StorageSettings(database, keys, None, SECRET_KEY_ENV, retention, database_url)
    if "secret_key_file" not in table:
        return StorageSettings(database, retention_days=retention, url=database_url)
    key_file = base_dir / _str(table, "secret_key_file", where)
    try:
        keys = read_secret_key_file(key_file)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return StorageSettings(
        database, keys, key_file, f"secret_key_file {key_file}", retention, database_url
    )


def _postgres_url(url: str, where: str) -> str:
    """A PostgreSQL connection URI (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS),
    checked by libpq's own parser; never echoed (it may hold a password)."""
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise ConfigError(f"{where}: url is not a valid postgresql:// connection URI") from None
    return url


def _sqlite_path(url: str, base_dir: Path, where: str) -> Path:
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise ConfigError(  # only the scheme: the rest may hold a password
            f"{where}: url must be sqlite:///PATH or postgresql://... (got {scheme!r})"
        )
    path = Path(url[len(prefix) :])
    return path if path.is_absolute() else base_dir / path


def _server(table: dict[str, Any], where: str) -> ServerSettings:
    defaults = ServerSettings()
    _refuse_unknown(table, tuple(defaults.__dict__), where)
    proxies = table.get("trusted_proxies", [])
    if not isinstance(proxies, list):
        raise ConfigError(f"{where}: trusted_proxies must be a list of IP addresses or networks")
    return ServerSettings(
        max_in_flight=_count(table, "max_in_flight", where, defaults.max_in_flight),
        trusted_proxies=tuple(_proxy(entry, where) for entry in proxies),
        shutdown_seconds=_number(table, "shutdown_seconds", where, defaults.shutdown_seconds),
    )


def _delivery(table: dict[str, Any], where: str) -> DeliverySettings:
    defaults = DeliverySettings()
    _refuse_unknown(table, tuple(defaults.__dict__), where)
    return DeliverySettings(
        mode=_mode(table, "mode", where, defaults.mode),
        sync_budget_seconds=_number(
            table, "sync_budget_seconds", where, defaults.sync_budget_seconds
        ),
        max_queued_events=_count(table, "max_queued_events", where, defaults.max_queued_events),
        max_concurrent_requests=_count(
            table, "max_concurrent_requests", where, defaults.max_concurrent_requests
        ),
    )


def _console(table: dict[str, Any], where: str) -> ConsoleSettings:
    defaults = ConsoleSettings()
    _refuse_unknown(table, tuple(defaults.__dict__), where)
    digest = table.get("token_sha256")
    if digest is not None:
        # Never echoed: a token pasted here by mistake would land in the error message.
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest.strip().lower()):
            raise ConfigError(
                f"{where}: token_sha256 must be the 64 hex digits of the token's SHA-256 "
                "(funnelgate console-token makes a token and stores its hash for you)"
            )
        digest = digest.strip().lower()
    origin = table.get("origin")
    if origin is not None:
        if not isinstance(origin, str) or not CONSOLE_ORIGIN.fullmatch(origin.rstrip("/")):
            raise ConfigError(
                f"{where}: origin must be a scheme and host like https://funnelgate.example.com"
            )
        origin = origin.rstrip("/").lower()
    return ConsoleSettings(
        enabled=_flag(table, "enabled", where, defaults.enabled),
        token_sha256=digest,
        session_hours=_number(table, "session_hours", where, defaults.session_hours),
        origin=origin,
    )


def _metrics(table: dict[str, Any], where: str) -> MetricsSettings:
    defaults = MetricsSettings()
    _refuse_unknown(table, tuple(defaults.__dict__), where)
    path = _str(table, "path", where, defaults.path)
    if not METRICS_PATH.fullmatch(path) or path.endswith("/"):
        raise ConfigError(
            f"{where}: path must be an absolute path such as /metrics, with no trailing slash "
            f"(got {path!r})"
        )
    port = table.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
    ):
        raise ConfigError(f"{where}: port must be a TCP port number (1-65535)")
    if port is None:  # on the main server: next to its routes
        if path in _SERVED_PATHS or path.startswith(_SERVED_PREFIXES):
            raise ConfigError(f"{where}: path {path} is already one of the server's routes")
        if "host" in table:
            raise ConfigError(
                f"{where}: host needs port (without one, the main server serves {path})"
            )
    return MetricsSettings(
        enabled=_flag(table, "enabled", where, defaults.enabled),
        path=path,
        port=port,
        host=_str(table, "host", where, defaults.host),
    )


def _mode(table: dict[str, Any], key: str, where: str, default: str) -> str:
    value = table.get(key, default)
    if value not in DELIVERY_MODES:
        raise ConfigError(f'{where}: {key} must be "sync" or "queued" (got {value!r})')
    return str(value)


def _proxy(entry: Any, where: str) -> str:
    """An IP address or a CIDR network, as uvicorn's `forwarded_allow_ips` matches them.

    uvicorn treats anything else as a literal that no client address equals, so a typo would
    trust nobody in silence; `*` (trust everyone) is not offered.
    """
    bad = f"{where}: trusted_proxies: {entry!r} is not an IP address or CIDR network"
    if not isinstance(entry, str):
        raise ConfigError(bad)
    try:
        if "/" not in entry:
            return str(ipaddress.ip_address(entry))
        network = ipaddress.ip_network(entry, strict=False)
        exact = ipaddress.ip_interface(entry).ip == network.network_address
    except ValueError:
        raise ConfigError(bad) from None
    if not exact:
        raise ConfigError(f"{where}: trusted_proxies: {entry!r} has host bits set ({network}?)")
    return str(network)


def _project(item: Any, base_dir: Path, env: dict[str, str], where: str) -> Project:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    if isinstance(item.get("id"), str):
        where = f"{where} ({item['id']!r})"
    _refuse_unknown(item, _PROJECT_KEYS, where)
    project_id = _str(item, "id", where)
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
    for name in ("default_phone_region", "test_event_code"):
        value = item.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where}: {name} must be a non-empty string")
    region = item.get("default_phone_region")
    if region is not None and region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(f"{where}: default_phone_region must be an ISO 3166-1 alpha-2 code")
    return Project(
        id=project_id,
        public_key=key,
        facebook_access_token=_secret(item, "facebook_access_token", base_dir, env, where),
        facebook_app_secret=_secret(item, "facebook_app_secret", base_dir, env, where),
        default_phone_region=region.upper() if region else None,
        test_event_code=item.get("test_event_code"),
        delivery_mode=_mode(item, "delivery_mode", where, "") if "delivery_mode" in item else None,
    )


def _secret(
    table: dict[str, Any], name: str, base_dir: Path, env: dict[str, str], where: str
) -> str | None:
    """`name` itself, the file `name_file` holds (trimmed), or the variable `name_env` names."""
    given = [key for key in (name, f"{name}_file", f"{name}_env") if key in table]
    if not given:
        return None
    if len(given) > 1:
        raise ConfigError(f"{where}: set only one of {', '.join(given)}")
    key = given[0]
    value = _str(table, key, where)
    if key == name:
        return value
    if key.endswith("_env"):
        secret = env.get(value, "").strip()
        if not secret:
            raise ConfigError(f"{where}: {key}: the environment variable {value} is not set")
        return secret
    path = base_dir / value
    try:
        with path.open("rb") as file:
            data = file.read(MAX_SECRET_FILE_BYTES + 1)
        secret = data.decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {key} {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {key} {path} is not UTF-8 text") from None
    if len(data) > MAX_SECRET_FILE_BYTES or not secret:
        raise ConfigError(f"{where}: {key} {path} must hold one secret (empty or too large)")
    return secret
