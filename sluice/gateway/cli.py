"""The ``sluice`` command line."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console
from sqlalchemy.exc import DBAPIError
from rich.table import Table

from sluice.gateway.accounts.tenants import Accounts, key_dict, parse_duration, tenant_dict
from sluice.gateway.ledger.audit import cli_audit
from sluice.gateway.ledger.writer import is_unreachable
from sluice.gateway.accounts.auth import issue_admin_token
from sluice.gateway.cli_accounting import register as register_accounting
from sluice.gateway.cli_warmup import register as register_warmup
from sluice.gateway.db.session import create_engine, migrate, sessionmaker
from sluice.gateway.errors import InvalidRequest, SluiceError
from sluice.gateway.settings import Settings, SettingsError

out = Console()
CLI = f"cli:{getpass.getuser()}"
err = Console(stderr=True)


def _run_accounts(settings: Settings, work: Callable[[Accounts], Awaitable[Any]]) -> Any:
    """Run ``work`` with an Accounts whose changes go to the CLI's persistent audit chain."""

    async def main() -> Any:
        engine = create_engine(settings.database_url)
        audit = cli_audit(engine, settings)
        try:
            return await work(Accounts(sessionmaker(engine), audit=audit))
        finally:
            await audit.close()
            await engine.dispose()

    return asyncio.run(main())


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    return table


def _show(args: argparse.Namespace, data: Any, human: str | Table) -> int:
    """What a command prints: ``data`` as JSON with ``--json``, else ``human`` for a person."""
    if args.json:
        print(json.dumps(data))
    else:
        out.print(human)
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    migrate(settings.database_url, args.revision, downgrade=args.downgrade)
    err.print(f"[green]database at revision {args.revision}[/]")
    return 0


async def _bootstrap(accounts: Accounts) -> str | None:
    """First start: a default tenant and one key, so `make run` is usable at once."""
    if await accounts.list_tenants():
        return None
    try:
        await accounts.create_tenant("default")
    except InvalidRequest:  # another replica starting at the same moment made it first
        return None
    return (await accounts.create_key("default", name="bootstrap")).secret


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from sluice.gateway.app import create_app
    from sluice.gateway.http.connections import protocol as connection_protocol

    if settings.database_url.startswith("sqlite"):
        migrate(settings.database_url)  # the embedded database keeps itself current
    try:
        secret = _run_accounts(settings, _bootstrap)
    except (DBAPIError, OSError, TimeoutError) as exc:
        reason = type(getattr(exc, "orig", None) or exc).__name__
        if not is_unreachable(exc):
            err.print(f"[red]error:[/] database not ready ({reason}); run `sluice migrate` first")
            return 2
        if settings.db_outage != "serve":
            err.print(f"[red]error:[/] database unreachable ({reason}); SLUICE_DB_OUTAGE=serve "
                      "starts anyway")
            return 2
        # Keys come from the persisted cache, usage goes to the WAL and the spool (ledger/).
        err.print(f"[yellow]warning:[/] database unreachable ({reason}); serving known keys "
                  "from the local cache, usage is spooled until it is back")
        secret = None
    if secret:
        err.print(
            "\n[bold]First start:[/] created tenant [cyan]default[/] and this API key "
            "(shown once, store it now):\n"
            f"\n    [bold green]{secret}[/]\n"
            "\nAdmin API token: [cyan]sluice admin-token[/]\n"
        )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=settings.log_level,
        loop="uvloop",
        # Bounds (edge, issue 18): a deadline on request heads, idle keep-alives closed,
        # X-Forwarded-* only from SLUICE_TRUSTED_PROXIES (nobody by default, not loopback).
        http=connection_protocol(args.http, settings.header_timeout_s),
        timeout_keep_alive=settings.idle_timeout_s,
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
        access_log=args.access_log,
        timeout_graceful_shutdown=30,
    )
    return 0


def cmd_tenants_create(args: argparse.Namespace, settings: Settings) -> int:
    tenant = _run_accounts(
        settings, lambda a: a.create_tenant(args.name, rpm=args.rpm, tpm=args.tpm, actor=CLI)
    )
    return _show(args, tenant_dict(tenant), f"created tenant [cyan]{tenant.name}[/] ({tenant.id})")


def cmd_tenants_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = [tenant_dict(t) for t in _run_accounts(settings, lambda a: a.list_tenants())]
    return _show(args, rows,
                 _table("tenants", rows, ["id", "name", "disabled", "rpm", "tpm", "created_at"]))


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    expires = parse_duration(args.expires_in) if args.expires_in else None
    created = _run_accounts(
        settings,
        lambda a: a.create_key(
            args.tenant, name=args.name, models=models, expires_in=expires,
            rpm=args.rpm, tpm=args.tpm, actor=CLI,
        ),
    )
    if args.json:
        print(json.dumps({**key_dict(created.key), "key": created.secret}))
    else:
        out.print(f"created key {created.key.id} for tenant {args.tenant} (shown once):")
        print(created.secret)
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = [key_dict(k) for k in _run_accounts(settings, lambda a: a.list_keys(args.tenant))]
    return _show(args, rows, _table("API keys", rows, [
        "id", "tenant_id", "prefix", "name", "models", "expires_at", "revoked_at",
        "last_used_at"]))


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    key = _run_accounts(settings, lambda a: a.revoke_key(args.key_id, actor=CLI))
    return _show(args, key_dict(key),
                 f"revoked {key.id} (effective within {settings.key_cache_ttl_s:g}s)")


def cmd_admins_create(args: argparse.Namespace, settings: Settings) -> int:
    from sluice.gateway.accounts.admins import create_admin

    password = args.password or getpass.getpass("password: ")
    admin = _run_accounts(settings, lambda a: create_admin(a.sessions, args.username, password))
    out.print(f"created admin [cyan]{admin.username}[/]")
    return 0


def cmd_admin_token(args: argparse.Namespace, settings: Settings) -> int:
    print(issue_admin_token(settings.admin_jwt_secret, args.subject, args.ttl))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="sluice LLM gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--access-log", action="store_true")
    p.add_argument(
        "--http", choices=["h11", "httptools"], default="h11",
        help="HTTP/1.1 parser (h11 notices clients that leave mid-stream most reliably)",
    )
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("migrate", help="upgrade the database schema")
    p.add_argument("revision", nargs="?", default="head")
    p.add_argument("--downgrade", action="store_true")
    p.set_defaults(handler=cmd_migrate)

    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(
        dest="action", required=True)
    p = tenants.add_parser("create")
    p.add_argument("name")
    p.add_argument("--rpm", type=int)
    p.add_argument("--tpm", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_tenants_create)
    p = tenants.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_tenants_list)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True)
    p = keys.add_parser("create")
    p.add_argument("--tenant", required=True)
    p.add_argument("--name", default="")
    p.add_argument("--models", help="comma-separated models the key may use (default: all)")
    p.add_argument("--expires-in", help="e.g. 30d, 12h")
    p.add_argument("--rpm", type=int)
    p.add_argument("--tpm", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_keys_create)
    p = keys.add_parser("list")
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_keys_list)
    p = keys.add_parser("revoke")
    p.add_argument("key_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_keys_revoke)

    admins = sub.add_parser("admins", help="manage dashboard admins").add_subparsers(
        dest="action", required=True)
    p = admins.add_parser("create")
    p.add_argument("username")
    p.add_argument("--password", help="(prompted when omitted)")
    p.set_defaults(handler=cmd_admins_create)

    register_accounting(sub)
    register_warmup(sub)

    p = sub.add_parser("admin-token", help="print an admin JWT for /admin/api")
    p.add_argument("--subject", default="cli")
    p.add_argument("--ttl", type=int, default=3600, help="seconds")
    p.set_defaults(handler=cmd_admin_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return int(args.handler(args, settings))
    except (SettingsError, SluiceError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
