"""The `funnelgate` command: serve, token, credentials."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from server.config import Config, load_config
from server.errors import ConfigError
from server.storage.credentials import CredentialStore


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

    token = commands.add_parser("token", help="mint a user token (JWT) for testing and curl")
    _config_arg(token)
    token.add_argument("--project", required=True)
    token.add_argument("--user", required=True)
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
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
    import uvicorn  # noqa: PLC0415 - only `serve` needs the server stack

    from server import logs  # noqa: PLC0415
    from server.app import create_app  # noqa: PLC0415
    from server.devsetup import DEV_DIR, ensure_dev_setup, try_it  # noqa: PLC0415

    dev = not (args.config or os.environ.get("FUNNELGATE_CONFIG"))
    if dev:
        args.config = ensure_dev_setup()
    config = _config(args)
    logs.configure()
    if dev:
        project_id = next(iter(config.projects))
        base = f"http://{args.host}:{args.port}"
        print(
            f"funnelgate dev setup in {DEV_DIR}/ (sandbox Graph: nothing leaves this machine).\n"
            f"Try it:\n\n{try_it(DEV_DIR, project_id, base)}\n\n"
            f"Then see what Meta would have received: curl -sS {base}/sandbox/events\n",
            flush=True,
        )
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        access_log=False,  # funnelgate logs one JSON line per request itself
        log_config=None,
        server_header=False,
        proxy_headers=False,  # nothing reads the client address or scheme: skip the rewrite
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


def _store(config: Config) -> CredentialStore:
    return CredentialStore(config.database_path)


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
    _store(config).set(project, args.user, token)
    print(f"stored the access token for user {args.user!r} in project {project!r}")
    return 0


def _credentials_list(args: argparse.Namespace) -> int:
    config = _config(args)
    project = _project_id(config, args.project) if args.project else None
    for info in _store(config).list(project):
        updated = datetime.fromtimestamp(info.updated_at, UTC).isoformat(timespec="seconds")
        print(f"{info.project_id}\t{info.user_id}\tupdated {updated}")
    return 0


def _credentials_remove(args: argparse.Namespace) -> int:
    config = _config(args)
    if not _store(config).remove(_project_id(config, args.project), args.user):
        print(f"no credential for user {args.user!r}", file=sys.stderr)
        return 1
    print(f"removed the credential of user {args.user!r}")
    return 0
