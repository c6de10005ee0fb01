"""The `funnelgate` command: serve, init, token, credentials, events, console-token."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from starlette.types import ASGIApp

from server.config import Config, load_config
from server.durations import human_age
from server.errors import ConfigError
from server.storage import outbox, schema_pg
from server.storage.credentials import (
    EXTERNAL,
    MAX_SELECTOR,
    Credential,
    CredentialStore,
    open_credentials,
)
from server.storage.database import ERRORS, Connection, connect_sync, first_line, is_postgres
from server.storage.outbox import CREDENTIAL_REMOVED, EventStatus
from server.storage.schema import upgrade_schema

VERSION = version("funnelgate")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except (ConfigError, UsageError) as exc:
        print(f"funnelgate: {exc}", file=sys.stderr)
        return 2
    except ERRORS as exc:  # e.g. the server held the write lock past busy_timeout
        print(f"funnelgate: storage: {first_line(exc)}", file=sys.stderr)
        return 1
    return result


class UsageError(Exception):
    """An option's value the command cannot use: one line, exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funnelgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"funnelgate {VERSION}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    _serve_parser(commands)

    init = commands.add_parser(
        "init", help="create a project key pair, a secret key and a starter config"
    )
    init.add_argument("directory", nargs="?", type=Path, default=Path(), help="default: .")
    init.set_defaults(handler=_init)

    token = commands.add_parser("token", help="mint a user token (JWT) for testing and curl")
    _config_arg(token)
    token.add_argument("--project", required=True)
    token.add_argument("--user", required=True)
    token.add_argument("--ttl", type=int, default=3600, help="seconds, > 0 (default 3600)")
    token.add_argument("--private-key-file", type=Path, required=True)
    token.set_defaults(handler=_token)

    creds = commands.add_parser("credentials", help="manage connected users' Meta access tokens")
    actions = creds.add_subparsers(required=True, metavar="ACTION")
    set_ = actions.add_parser(
        "set",
        help="store an access token (from a file, or - for stdin) as one of a user's "
        "credentials: a new one, or the one --credential-id or --external-id names",
    )
    list_ = actions.add_parser(
        "list", help="id, external id, label, default, status, last use (never the token)"
    )
    remove = actions.add_parser(
        "remove",
        help="delete a credential (by id, or a user's by external id, or all of a user's); "
        "its held events fail",
    )
    for sub in (set_, list_, remove):
        _config_arg(sub)
    set_.add_argument("--project", required=True)
    set_.add_argument("--user", required=True, help="the connected user (the user token's sub)")
    list_.add_argument("--project", help="one project's (default: all)")
    list_.add_argument("--user", help="one user's (default: all)")
    remove.add_argument("--project", required=True)
    remove.add_argument("--user", help="whose credential it is; alone: all of the user's")
    set_.add_argument(
        "--access-token-file",
        required=True,
        help="file holding the token, or - to read it from stdin",
    )
    for sub in (remove, set_):
        which = sub.add_mutually_exclusive_group()
        which.add_argument(
            "--credential-id",
            help="the credential's id, a UUID"
            + (" (default: the user's default credential, made at the first set)"
               if sub is set_ else ""),
        )  # fmt: skip
        which.add_argument(
            "--external-id",
            help="your own id for the credential, unique per user (header: ext:<id>)"
            + ("; needs --user" if sub is remove else ""),
        )
    which.add_argument(  # set_'s group, made last
        "--new", action="store_true", help="another credential of the user, with a new id"
    )
    set_.add_argument("--label", help="a name to tell the user's credentials apart")
    set_.add_argument(
        "--default",
        action="store_true",
        help="calls without X-Paragon-Credential use it (a user's first credential is default)",
    )
    list_.add_argument("--json", action="store_true", help="one JSON object per line")
    set_.set_defaults(handler=_credentials_set)
    list_.set_defaults(handler=_credentials_list)
    remove.set_defaults(handler=_credentials_remove)
    new_key = actions.add_parser(
        "new-key", help="put a fresh secret key first in the key file (never printed)"
    )
    _config_arg(new_key)
    new_key.add_argument("--key-file", type=Path, help="default: [storage] secret_key_file")
    new_key.set_defaults(handler=_credentials_new_key)
    rotate = actions.add_parser(
        "rotate-key", help="re-encrypt every stored token with the newest secret key"
    )
    _config_arg(rotate)
    rotate.set_defaults(handler=_credentials_rotate_key)
    _events_parser(commands)
    _console_parser(commands)
    _db_parser(commands)
    return parser


def _db_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser("db", help="the database's schema")
    actions = db.add_subparsers(required=True, metavar="ACTION")
    upgrade = actions.add_parser(
        "upgrade",
        help="bring the schema to this version's (serve does it at start; safe while other "
        "instances start or run)",
    )
    _config_arg(upgrade)
    upgrade.set_defaults(handler=_db_upgrade)


def _db_upgrade(args: argparse.Namespace) -> int:
    config = _config(args)
    before, after = upgrade_schema(config.storage)
    where = config.storage.where
    if before == after:
        print(f"{where}: schema version {after}, up to date")
    else:
        print(f"{where}: schema version {before} -> {after}")
    return 0


def _serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="serve the tool endpoint")
    serve.add_argument(
        "--config",
        type=Path,
        help="TOML config (default: $FUNNELGATE_CONFIG, "
        "else a dev setup in ./.funnelgate with the sandbox Graph)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help=f"processes sharing the port, 1 to {MAX_WORKERS} (default 1: one process); "
        "see the README on SQLite's limits",
    )
    serve.set_defaults(handler=_serve)


def _events_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    events = commands.add_parser(
        "events", help="accepted events: list them, count them, replay failed ones"
    )
    actions = events.add_subparsers(required=True, metavar="ACTION")
    list_ = actions.add_parser("list", help="the newest events (never their customer data)")
    replay = actions.add_parser("replay", help="queue failed events again, with the same event_id")
    stats = actions.add_parser("stats", help="counts by status, oldest pending age, per pixel")
    for sub in (list_, replay, stats):
        _config_arg(sub)
        sub.add_argument("--project", help="one project (default: all)")
    list_.add_argument("--status", help="queued, held, delivered or failed")
    list_.add_argument(
        "--since", help="changed in the last 30m, 1h, 2d, 1w, or since an ISO-8601 time (UTC)"
    )
    list_.add_argument(
        "--limit",
        default=str(LIST_DEFAULT),
        help=f"at most N (default {LIST_DEFAULT}, max {LIST_MAX:,})",
    )
    for sub in (list_, stats):
        sub.add_argument("--json", action="store_true", help="JSON (list: one object a line)")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--event-id", nargs="+", action="extend", metavar="ID", help="these events")
    which.add_argument("--all-failed", action="store_true", help="every failed event")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed")
    list_.set_defaults(handler=_events_list)
    replay.set_defaults(handler=_events_replay)
    stats.set_defaults(handler=_events_stats)


def _console_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    console = commands.add_parser(
        "console-token",
        help="make a new admin token for the console (/console): printed once, its hash "
        "stored beside the database; the old token stops working",
    )
    _config_arg(console)
    console.set_defaults(handler=_console_token)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config (default: $FUNNELGATE_CONFIG)")


def _config(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("FUNNELGATE_CONFIG")
    if not path:
        raise ConfigError("no config: pass --config PATH or set FUNNELGATE_CONFIG")
    return load_config(Path(path), dict(os.environ))


def _project_id(config: Config, project: str) -> str:
    if project not in config.projects:
        raise ConfigError(f"project {project!r} is not in the config")
    return project


def _serve(args: argparse.Namespace) -> int:
    from server.devsetup import DEV_DIR, ensure_dev_setup, try_it  # noqa: PLC0415

    dev = not (args.config or os.environ.get("FUNNELGATE_CONFIG"))
    if dev:
        args.config = ensure_dev_setup()
    config = _config(args)
    open_credentials(config.storage).close()  # a missing or wrong key stops start-up here

    from server import logs  # noqa: PLC0415 - only a valid config needs the app

    base = f"http://{args.host}:{args.port}"
    print(summary(config, base, dev=dev), file=sys.stderr, flush=True)
    logs.configure()
    if args.workers == 1:  # else uvicorn's supervisor handles the signals
        signal.signal(signal.SIGTERM, logs.flush_then_reraise)  # uvicorn re-raises it at the end
    if dev:
        project_id = next(iter(config.projects))
        print(
            f"funnelgate dev setup in {DEV_DIR}/ (sandbox Graph: nothing leaves this machine).\n"
            f"Try it:\n\n{try_it(DEV_DIR, project_id, base)}\n\n"
            f"Then see what Meta would have received: curl -sS {base}/sandbox/events\n"
            f"{_dev_console(config, base)}",
            flush=True,
        )
    if args.workers > 1:
        from server import workers  # noqa: PLC0415

        path = Path(args.config or os.environ["FUNNELGATE_CONFIG"]).resolve()
        return workers.serve(
            config, path, host=args.host, port=args.port, count=args.workers,
            options=uvicorn_options(config),
        )  # fmt: skip
    from server.app import create_app  # noqa: PLC0415

    server = FrozenAfterStartup(uvicorn_config(create_app(config), config, args.host, args.port))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn has shut down already
        server.run()
    return 0 if server.started else 3  # 3: uvicorn's start-up failure code


MAX_WORKERS = 64


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"a whole number from 1 to {MAX_WORKERS}, not {text!r}")
    return count


def summary(config: Config, base: str, *, dev: bool) -> str:
    """One line: where it listens, the projects, where events go; the sandbox in a real config
    is a WARNING, since nothing would reach Meta."""
    ids = list(config.projects)
    shown = ", ".join(ids[:3]) + (f", +{len(ids) - 3} more" if len(ids) > 3 else "")
    graph = config.graph
    target = "the built-in sandbox" if graph.sandbox else graph.base_url
    if not graph.sandbox:
        sandbox = "sandbox off"
    elif dev:
        sandbox = "sandbox on (dev setup)"
    else:
        sandbox = "WARNING: sandbox ON, events go to the built-in sandbox and never reach Meta"
    return (
        f"funnelgate {VERSION} on {base}: {len(ids)} project(s) ({shown}); "
        f"Graph {target} {graph.api_version}; {sandbox}"
    )


def uvicorn_config(app: ASGIApp, config: Config, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, **uvicorn_options(config))


def uvicorn_options(config: Config) -> dict[str, Any]:
    """uvicorn's settings for `config`, one process or several."""
    proxies = list(config.server.trusted_proxies)
    return {
        "access_log": False,  # funnelgate logs one JSON line per request itself
        "log_config": None,
        "server_header": False,
        # Forwarded headers are believed only from the configured proxies; with none, the
        # rewrite is skipped entirely.
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies,
        # Whole seconds, half the budget: the other half lets the dispatcher finish its sends
        # (server/app.py's lifespan).
        "timeout_graceful_shutdown": max(1, math.floor(config.server.shutdown_seconds / 2)),
    }


class FrozenAfterStartup(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # The ~100k objects of start-up (schemas, pycountry, the MCP SDK) never die: out of the
        # collector's sight, a full collection stops costing ~30 ms. Frozen here, once the app
        # has started and before the first request, because it is process-wide: the serving
        # process decides it, not the app.
        gc.freeze()


def _init(args: argparse.Namespace) -> int:
    from server.devsetup import CONFIG, KEY_FILE, PRIVATE_KEY, init_setup  # noqa: PLC0415

    root: Path = args.directory
    project_id = init_setup(root)
    config = root / CONFIG
    print(
        f"created {config} (project {project_id}), the project key pair in {root / 'keys'}/ "
        f"and the secret key file {root / KEY_FILE}; private files are 0600.\n"
        f"Next: give the project a Meta access token (see {config}), then\n"
        f"  funnelgate serve --config {config}\n"
        f"  funnelgate token --config {config} --project {project_id} --user USER "
        f"--private-key-file {root / PRIVATE_KEY}"
    )
    return 0


def _token(args: argparse.Namespace) -> int:
    from server.tokens import mint_user_token  # noqa: PLC0415

    config = _config(args)
    try:
        pem = args.private_key_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.private_key_file} ({exc.strerror})") from None
    print(mint_user_token(pem, _project_id(config, args.project), args.user, ttl_seconds=args.ttl))
    return 0


def _credentials_set(args: argparse.Namespace) -> int:
    config = _config(args)
    project = _project_id(config, args.project)
    credential_id = _uuid(args.credential_id) if args.credential_id is not None else None
    _check_names(args.external_id, args.label)
    if args.access_token_file == "-":  # noqa: S105 - the stdin marker, not a secret
        token = sys.stdin.read().strip()
    else:
        try:
            token = Path(args.access_token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.access_token_file} ({exc.strerror})") from None
    if not token:
        raise ConfigError("the access token is empty")
    with contextlib.closing(open_credentials(config.storage)) as store:
        if credential_id is None and args.external_id is None and not args.new:
            # Naming none: the user's token, as before credentials had ids (its default).
            default = store.find(project, args.user)
            credential_id = None if default is None else default.id
        stored, new = store.set(
            project, args.user, token,
            credential_id=credential_id, external_id=args.external_id, label=args.label,
            make_default=args.default,
        )  # fmt: skip
    resumed = _settle_held(
        config,
        lambda db, limit: outbox.release_held(
            db, now=time.time(), project_id=project, credential_id=stored.id, limit=limit
        ),
    )
    print(
        f"{'stored' if new else 'replaced'} the access token of credential {stored.id} "
        f"(user {args.user!r}, project {project!r}{', default' if stored.default else ''}; "
        f"encrypted); {_held_events(resumed)} resumed"
    )
    return 0


MAX_NAME = MAX_SELECTOR - len(EXTERNAL)  # an external id, and a label: `ext:<id>` fits a header


def _check_names(external_id: str | None, label: str | None) -> None:
    """An external id X-Paragon-Credential can carry as `ext:<id>` (the server reads the
    header as latin-1 and strips it: anything else could be stored but never selected), and a
    label `list` can print in one cell."""
    if external_id is not None and not (
        0 < len(external_id) <= MAX_NAME and external_id.isascii() and external_id.isprintable()
        and external_id == external_id.strip()
    ):  # fmt: skip
        raise UsageError(
            f"--external-id must be 1 to {MAX_NAME} printable ASCII characters, without "
            "spaces at either end (X-Paragon-Credential carries it as ext:<id>)"
        )
    if label is not None and not (0 < len(label) <= MAX_NAME and label.isprintable()):
        raise UsageError(f"--label must be 1 to {MAX_NAME} printable characters")


def _uuid(value: str) -> str:
    """A UUID in its canonical form: the header names the credential by that exact text."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise UsageError("--credential-id must be a UUID") from None


def _credentials_list(args: argparse.Namespace) -> int:
    config = _config(args)
    project = _project_id(config, args.project) if args.project is not None else None
    with contextlib.closing(_unverified(config)) as store:
        found = store.list(project, args.user)
    if not found:
        print("funnelgate: no credentials matched", file=sys.stderr)
        return 1
    if args.json:
        for credential in found:
            print(orjson.dumps(_public(credential)).decode())
        return 0
    print("\t".join(name.upper() for name in CREDENTIAL_COLUMNS))
    for credential in found:
        row = _public(credential)
        print("\t".join(_shown(row[name]) for name in CREDENTIAL_COLUMNS))
    return 0


CREDENTIAL_COLUMNS = (
    "project", "user", "id", "external_id", "label", "default", "status", "refused", "last_used",
    "updated", "key",
)  # fmt: skip


def _shown(value: Any) -> str:
    """A table cell: `-` for none, and nothing a terminal would act on (a tab splits cells)."""
    if value is None:
        return "-"
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return "".join(c if c.isprintable() else "?" for c in text)


def _public(credential: Credential) -> dict[str, Any]:
    """What `list` shows of a credential: ids, state, Meta's refusal; never the token."""
    error = credential.status_error or {}
    return {
        "project": credential.project_id,
        "user": credential.user_id,
        "id": credential.id,
        "external_id": credential.external_id,
        "label": credential.label,
        "default": credential.default,
        "status": credential.status,
        "refused": (error.get("upstream") or {}).get("code") if error else None,
        "last_used": None if credential.last_used_at is None else _iso(credential.last_used_at),
        "updated": _iso(credential.updated_at),
        "key": credential.key_id,
        "error": error or None,
    }


def _credentials_remove(args: argparse.Namespace) -> int:
    # Imported here: it brings the Graph client along, and the CLI starts twice as fast.

    config = _config(args)
    project = _project_id(config, args.project)
    if args.external_id is not None and args.user is None:
        raise UsageError("--external-id needs --user: external ids are unique per user")
    if args.credential_id is None and args.user is None:
        raise UsageError("name the credentials: --credential-id, or --user (with --external-id)")
    _check_names(args.external_id, None)
    credential_id = _uuid(args.credential_id) if args.credential_id is not None else None
    with contextlib.closing(_unverified(config)) as store:
        if credential_id is not None:
            found = store.by_id(project, credential_id)
            chosen = [found] if found and args.user in (None, found.user_id) else []
        elif args.external_id is not None:
            found = store.find(project, args.user, EXTERNAL + args.external_id)
            chosen = [found] if found else []
        else:
            chosen = store.list(project, args.user)
        removed = [credential for credential in chosen if store.remove(project, credential.id)]
        heirs = [store.find(project, c.user_id) for c in removed if c.default]
    if not removed:
        missing = _missing(credential_id, args.external_id, args.user)
        print(f"funnelgate: {missing} in project {project!r}", file=sys.stderr)
        return 1
    for credential in removed:
        failed = _settle_held(
            config,
            lambda db, limit: outbox.fail_held(
                db, now=time.time(), project_id=project, credential_id=credential.id,  # noqa: B023
                error=CREDENTIAL_REMOVED, limit=limit,
            ),
        )  # fmt: skip
        print(
            f"removed credential {credential.id} of user {credential.user_id!r}; "
            f"{_held_events(failed)} failed ({CREDENTIAL_REMOVED['code']})"
        )
    for heir in heirs:
        if heir is not None:  # calls without X-Paragon-Credential go with it from now on
            print(f"credential {heir.id} is now the default of user {heir.user_id!r}")
    return 0


def _missing(credential_id: str | None, external_id: str | None, user: str | None) -> str:
    """What `remove` did not find, as it was asked for."""
    of_user = "" if user is None else f" of user {user!r}"
    if credential_id is not None:
        return f"no credential {credential_id}{of_user}"
    if external_id is not None:
        return f"no credential ext:{external_id}{of_user}"
    return f"no credentials{of_user}"


def _settle_held(config: Config, step: Callable[[Connection, int], int]) -> int:
    """Runs `step` (a release or a fail of held rows, at most BATCH each, one transaction each)
    until it changes none: the running server's writer never waits long on the CLI."""
    total = 0
    with contextlib.closing(_outbox_db(config)) as db:
        while True:
            started = time.monotonic()
            changed = step(db, BATCH)
            if not changed:
                return total
            total += changed
            _let_the_server_write(time.monotonic() - started, db)


def _held_events(count: int) -> str:
    return "no held events" if count == 0 else f"{count:,} held event(s)"


def _unverified(config: Config) -> CredentialStore:
    """list and remove need no key: they still work after a key is lost."""
    return open_credentials(config.storage, verify=False)


def _credentials_new_key(args: argparse.Namespace) -> int:
    from server.storage.crypto import add_secret_key  # noqa: PLC0415

    path: Path | None = args.key_file
    if path is None:
        path = _config(args).storage.secret_key_file
    if path is None:
        raise ConfigError(
            "no key file: pass --key-file F, or set [storage] secret_key_file in the config "
            "(with FUNNELGATE_SECRET_KEY, write the key to a file with --key-file and put it "
            "first in the variable)"
        )
    key = add_secret_key(path)
    print(
        f"added secret key {key.id} first in {path}: it encrypts from now on. Servers that read "
        "this file pick it up when they meet a token it sealed. Next: "
        "funnelgate credentials rotate-key"
    )
    return 0


def _credentials_rotate_key(args: argparse.Namespace) -> int:
    config = _config(args)
    store = open_credentials(config.storage)
    try:
        count = store.rotate()
        in_use = store.key_ids()
    finally:
        store.close()
    current = config.storage.secret_keys[0].id
    print(
        f"re-encrypted {count} access token(s) with secret key {current}; keys in use: "
        f"{', '.join(in_use) or 'none'}. Keys no longer in use can be removed from "
        f"{config.storage.secret_key_origin}."
    )
    return 0


# --- events: list, stats, replay -------------------------------------------------------------


def _dev_console(config: Config, base: str) -> str:
    """The dev setup's console: a fresh admin token each start (only its hash is kept)."""
    from server.console import auth  # noqa: PLC0415

    if config.console.token_sha256 is not None or not config.console.enabled:
        return ""
    token = auth.new_token()
    auth.write_token_file(auth.token_path(config.storage), auth.token_digest(token))
    return f"The console: {base}/console (admin token, new at each start: {token})\n"


def _console_token(args: argparse.Namespace) -> int:
    from server.console import auth  # noqa: PLC0415

    config = _config(args)
    if config.console.token_sha256 is not None:
        raise UsageError(
            "the config sets [console] token_sha256, which wins over a token file: remove it "
            "to use funnelgate console-token, or put your own token's SHA-256 there"
        )
    path = auth.token_path(config.storage)
    token = auth.new_token()
    try:
        auth.write_token_file(path, auth.token_digest(token))
    except OSError as exc:
        raise ConfigError(f"cannot write {path} ({exc.strerror})") from None
    print(token)
    served = "" if config.console.enabled else " ([console] enabled = false: it is not served)"
    print(
        f"funnelgate: the console's token, shown this once; its SHA-256 is in {path} (0600). "
        f"Log in at /console{served}; a running server takes a new token at once (and ends "
        "the sessions of the old one), a first token once it restarts.",
        file=sys.stderr,
    )
    return 0


LIST_DEFAULT = 50
LIST_MAX = 10_000
BATCH = 1000  # rows per write transaction: the server's writer never waits long on the CLI
LOCK_GAP_SECONDS = 0.025  # see _let_the_server_write
CLI_BUSY_TIMEOUT_MS = 30_000
SHOWN = 20  # events and ids named in a replay's summary; the rest are counted
_DURATION = re.compile(r"(\d{1,7})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _outbox_db(config: Config) -> Connection:
    """The server's database (the CLI reads and writes while servers run), its schema brought
    up to date. A SQLite file is never created here: a missing file means a config that is not
    the server's."""
    path = config.storage.database_path
    if config.storage.url is None:
        if not path.exists():
            raise ConfigError(f"no database at {path}: is this the config the server runs with?")
        _unverified(config).close()  # brings the file to the current schema version first
    db = connect_sync(path, config.storage.url)
    try:
        if is_postgres(db):
            schema_pg.upgrade(db)
        else:
            # The server's writer may commit back to back under load: the CLI waits its turn.
            db.execute(f"PRAGMA busy_timeout={CLI_BUSY_TIMEOUT_MS}")
            outbox.create_schema(db)
    except BaseException:
        db.close()
        raise
    return db


def parse_since(text: str, now: float) -> float:
    """`30m`, `1h`, `2d`, `1w` ago, or an ISO-8601 time (UTC unless it says otherwise)."""
    if match := _DURATION.fullmatch(text.strip()):
        seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
        if seconds == 0:
            raise UsageError(f"--since {text}: the duration must be more than 0")
        return now - seconds
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--since {text[:40]!r}: use a duration (30m, 1h, 2d, 1w) or an ISO-8601 time "
            "(2025-01-31T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _error_code(row: EventStatus) -> str:
    if not row.error or row.status == "delivered":
        return ""
    error = orjson.loads(row.error)
    return str(error.get("code", "")) if isinstance(error, dict) else ""


def _cell(value: object, width: int) -> str:
    """A caller's string made safe for a terminal (no escape sequences) and cut to `width`."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def table(header: Sequence[str], rows: Sequence[Sequence[object]], widths: Sequence[int]) -> str:
    """Columns as wide as their widest cell, up to `widths`."""
    cells = [list(header)] + [
        [_cell(value, width) for value, width in zip(row, widths, strict=True)] for row in rows
    ]
    sizes = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(size) for cell, size in zip(line, sizes, strict=True)).rstrip()
        for line in cells
    )


def _events_list(args: argparse.Namespace) -> int:
    config = _config(args)
    project = _project_id(config, args.project) if args.project is not None else None
    if args.status is not None and args.status not in outbox.STATUSES:
        raise UsageError(f"--status must be one of {', '.join(outbox.STATUSES)}")
    since = parse_since(args.since, time.time()) if args.since else None
    try:
        limit = int(args.limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= LIST_MAX:
        raise UsageError(f"--limit must be a whole number from 1 to {LIST_MAX:,}")
    with contextlib.closing(_outbox_db(config)) as db:
        rows = outbox.list_events(
            db, project_id=project, status=args.status, since=since, limit=limit
        )
    if not rows:
        print("funnelgate: no events matched", file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            listed = {"project_id": row.project_id, "user_id": row.user_id, **row.public()}
            sys.stdout.write(orjson.dumps(listed).decode() + "\n")
    else:
        print(table(LIST_COLUMNS, [_list_row(row) for row in rows], LIST_WIDTHS))
    if len(rows) == limit:
        print(f"(the newest {limit:,}; --limit shows more, up to {LIST_MAX:,})", file=sys.stderr)
    return 0


LIST_COLUMNS = (
    "UPDATED",
    "PROJECT",
    "USER",
    "EVENT_ID",
    "EVENT",
    "PIXEL",
    "STATUS",
    "ATTEMPTS",
    "ERROR",
)
LIST_WIDTHS = (20, 24, 24, 40, 24, 20, 9, 8, 28)  # a cut value ends in …; --json has it whole


def _list_row(row: EventStatus) -> tuple[object, ...]:
    return (
        _iso(row.updated_at),
        row.project_id,
        row.user_id,
        row.event_id,
        row.event_name,
        row.pixel_id,
        row.status,
        row.attempts,
        _error_code(row),
    )


def _events_stats(args: argparse.Namespace) -> int:
    config = _config(args)
    project = _project_id(config, args.project) if args.project is not None else None
    with contextlib.closing(_outbox_db(config)) as db:
        counts = outbox.stats(db, project_id=project)
    now = time.time()
    if args.json:
        body = {
            "by_status": counts["by_status"],
            **_oldest(counts["oldest_pending"], now),
            "pixels": {
                pixel: {
                    **{s: entry[s] for s in outbox.STATUSES},
                    **_oldest(entry["oldest_pending"], now),
                }
                for pixel, entry in sorted(counts["pixels"].items())
            },
        }
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
        return 0
    print(", ".join(f"{counts['by_status'][s]:,} {s}" for s in outbox.STATUSES))
    print(f"oldest pending: {_age(counts['oldest_pending'], now) or 'none'}")
    if counts["pixels"]:
        header = ("PIXEL", *(s.upper() for s in outbox.STATUSES), "OLDEST PENDING")
        rows = [
            (pixel, *(f"{entry[s]:,}" for s in outbox.STATUSES), _age(entry["oldest_pending"], now))
            for pixel, entry in sorted(counts["pixels"].items())
        ]
        print(table(header, rows, (24, 12, 12, 12, 12, 40)))
    return 0


def _oldest(at: float | None, now: float) -> dict[str, str | int | None]:
    return {
        "oldest_pending_at": None if at is None else _iso(at),
        "oldest_pending_seconds": None if at is None else round(now - at),
    }


def _age(at: float | None, now: float) -> str:
    return "" if at is None else f"{human_age(now - at)} (accepted {_iso(at)})"


def _events_replay(args: argparse.Namespace) -> int:
    config = _config(args)
    project = _project_id(config, args.project) if args.project is not None else None
    ids = list(dict.fromkeys(args.event_id or ()))  # each id once, in the order given
    projects = [project] if project else list(config.projects)
    now = time.time()
    found: set[str] = set()
    shown: list[EventStatus] = []
    codes: Counter[str] = Counter()
    with contextlib.closing(_outbox_db(config)) as db, _progress(db, args, project, ids) as advance:
        for done, rows in _replay_batches(db, now, projects, project, ids, dry_run=args.dry_run):
            found.update(row.event_id for row in rows)
            shown += rows[: SHOWN - len(shown)]
            codes.update(_error_code(row) or "-" for row in rows)
            advance(done)
        missing = [event_id for event_id in ids if event_id not in found]
        why = {event_id: _newest_status(db, projects, event_id) for event_id in missing[:SHOWN]}
    count = codes.total()
    verb = "would replay" if args.dry_run else "replayed"
    if count:
        sends = "" if args.dry_run else "; the running server sends them within seconds"
        print(f"{verb} {count:,} failed event(s), same event_id{sends}")
        print("by error: " + ", ".join(f"{code} {n:,}" for code, n in codes.most_common()))
        named = [
            (r.project_id, r.event_id, r.event_name, r.pixel_id, _error_code(r)) for r in shown
        ]
        print(
            table(("PROJECT", "EVENT_ID", "EVENT", "PIXEL", "ERROR"), named, (24, 40, 24, 20, 28))
        )
        if count > len(shown):
            print(f"… and {count - len(shown):,} more")
    for event_id, status in why.items():
        reason = "not found" if status is None else f"not failed ({status})"
        print(f"funnelgate: {_cell(event_id, 80)}: {reason}", file=sys.stderr)
    if len(missing) > len(why):
        more = len(missing) - len(why)
        print(f"funnelgate: and {more:,} more ids not found or not failed", file=sys.stderr)
    if not count:
        print("funnelgate: no failed events matched", file=sys.stderr)
    return 0 if count and not missing else 1


def _replay_batches(
    db: Connection,
    now: float,
    projects: Sequence[str],
    project: str | None,
    ids: Sequence[str],
    *,
    dry_run: bool,
) -> Iterator[tuple[int, list[EventStatus]]]:
    """(progress made, rows replayed) per transaction of at most BATCH rows (or ids)."""
    replay = functools.partial(outbox.replay, db, now=now, limit=BATCH, dry_run=dry_run)
    if not ids:  # --all-failed: one pass in seq order, so rows failing anew are not met again
        after = 0
        while rows := _transaction(
            db, dry_run, replay, project_id=project, all_failed=True, after_seq=after
        ):
            after = rows[-1].seq
            yield len(rows), rows
            if len(rows) < BATCH:  # the last: no empty write transaction to find out
                return
        return
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        rows = []
        for p in projects:
            rows += _transaction(db, dry_run, replay, project_id=p, event_ids=chunk)
        yield len(chunk), rows


def _transaction(
    db: Connection,
    read_only: bool,
    job: Callable[..., list[EventStatus]],
    **kwargs: Any,
) -> list[EventStatus]:
    """`job(**kwargs)` in one write transaction (none for a read)."""
    if read_only:
        return job(**kwargs)
    started = time.monotonic()
    db.execute("BEGIN IMMEDIATE")
    try:
        result = job(**kwargs)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    _let_the_server_write(time.monotonic() - started, db)
    return result


def _let_the_server_write(held: float, db: Connection) -> None:
    """A pause after each write transaction, as long as it held the lock and at least 25 ms.
    SQLite has no queue for its write lock: a writer that found it taken sleeps and retries,
    at first after 1, 2, 5, 10, 15, 20, 25 ms (sqliteDefaultBusyCallback, sqlite3.c). Taking
    the lock again at once would starve the server's writer, and every queued call waits on
    it; a gap this long lets it in between two batches. PostgreSQL locks rows, not the
    database: no pause."""
    if not is_postgres(db):
        time.sleep(max(LOCK_GAP_SECONDS, held))


def _newest_status(db: Connection, projects: Sequence[str], event_id: str) -> str | None:
    """Why an id was not replayed: the status of its newest row, if any."""
    for project in projects:
        row = db.execute(
            "SELECT status FROM outbox WHERE project_id = ? AND event_id = ? "
            "ORDER BY seq DESC LIMIT 1",
            (project, event_id),
        ).fetchone()
        if row:
            return str(row[0])
    return None


@contextlib.contextmanager
def _progress(
    db: Connection, args: argparse.Namespace, project: str | None, ids: Sequence[str]
) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal's stderr for a replay of more than one batch."""
    if not sys.stderr.isatty():
        yield lambda done: None
        return
    total = len(ids) or outbox.stats(db, project_id=project)["by_status"]["failed"]
    if total <= BATCH:
        yield lambda done: None
        return
    from rich.console import Console  # noqa: PLC0415 - only long replays on a terminal
    from rich.progress import Progress  # noqa: PLC0415

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("checking" if args.dry_run else "replaying", total=total)
        yield lambda done: progress.advance(task, done)
