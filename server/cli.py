"""The `funnelgate` command: serve, init, token, credentials."""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import signal
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from server.config import Config, load_config
from server.errors import ConfigError
from server.storage.credentials import CredentialStore, open_credentials

VERSION = version("funnelgate")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except ConfigError as exc:
        print(f"funnelgate: {exc}", file=sys.stderr)
        return 2
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funnelgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"funnelgate {VERSION}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the tool endpoint")
    serve.add_argument(
        "--config",
        type=Path,
        help="TOML config (default: $FUNNELGATE_CONFIG, "
        "else a dev setup in ./.funnelgate with the sandbox Graph)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=_serve)

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
        "set", help="store a user's access token (from a file, or - for stdin)"
    )
    list_ = actions.add_parser("list", help="list stored credentials (never prints tokens)")
    remove = actions.add_parser("remove", help="delete a user's credential")
    for sub in (set_, list_, remove):
        _config_arg(sub)
        sub.add_argument("--project", required=sub is not list_)
    for sub in (set_, remove):
        sub.add_argument("--user", required=True)
    set_.add_argument(
        "--access-token-file",
        required=True,
        help="file holding the token, or - to read it from stdin",
    )
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
    return parser


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
    from server.app import create_app  # noqa: PLC0415

    base = f"http://{args.host}:{args.port}"
    print(summary(config, base, dev=dev), file=sys.stderr, flush=True)
    logs.configure()
    signal.signal(signal.SIGTERM, logs.flush_then_reraise)  # uvicorn re-raises it at the end
    if dev:
        project_id = next(iter(config.projects))
        print(
            f"funnelgate dev setup in {DEV_DIR}/ (sandbox Graph: nothing leaves this machine).\n"
            f"Try it:\n\n{try_it(DEV_DIR, project_id, base)}\n\n"
            f"Then see what Meta would have received: curl -sS {base}/sandbox/events\n",
            flush=True,
        )
    server = FrozenAfterStartup(uvicorn_config(create_app(config), config, args.host, args.port))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn has shut down already
        server.run()
    return 0 if server.started else 3  # 3: uvicorn's start-up failure code


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
    proxies = list(config.server.trusted_proxies)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,  # funnelgate logs one JSON line per request itself
        log_config=None,
        server_header=False,
        # Forwarded headers are believed only from the configured proxies; with none, the
        # rewrite is skipped entirely.
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies,
        # Whole seconds, half the budget: the other half lets the dispatcher finish its sends
        # (server/app.py's lifespan).
        timeout_graceful_shutdown=max(1, math.floor(config.server.shutdown_seconds / 2)),
    )


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
    if args.access_token_file == "-":  # noqa: S105 - the stdin marker, not a secret
        token = sys.stdin.read().strip()
    else:
        try:
            token = Path(args.access_token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.access_token_file} ({exc.strerror})") from None
    if not token:
        raise ConfigError("the access token is empty")
    store = open_credentials(config.storage)
    try:
        store.set(project, args.user, token)
    finally:
        store.close()
    print(f"stored the access token for user {args.user!r} in project {project!r} (encrypted)")
    return 0


def _credentials_list(args: argparse.Namespace) -> int:
    config = _config(args)
    project = _project_id(config, args.project) if args.project else None
    with contextlib.closing(_unverified(config)) as store:
        infos = store.list(project)
    for info in infos:
        updated = datetime.fromtimestamp(info.updated_at, UTC).isoformat(timespec="seconds")
        print(f"{info.project_id}\t{info.user_id}\tupdated {updated}\tkey {info.key_id}")
    return 0


def _credentials_remove(args: argparse.Namespace) -> int:
    config = _config(args)
    with contextlib.closing(_unverified(config)) as store:
        removed = store.remove(_project_id(config, args.project), args.user)
    if not removed:
        print(f"no credential for user {args.user!r}", file=sys.stderr)
        return 1
    print(f"removed the credential of user {args.user!r}")
    return 0


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
