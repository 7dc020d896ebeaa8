"""``sluice audit verify``, ``sluice db grant-app``, ``sluice usage export``,
``sluice billing push-stripe``.

:func:`register` adds them to the main parser's subcommands; each handler takes
``(args, settings)`` and returns the exit code. Failures print one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy import or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.ledger.audit import audit_key, checkpoint_file, cli_audit
from sluice.gateway.ledger.billing import BillingError, push_stripe, stripe_client
from sluice.gateway.ledger.chain import AuditKeyError
from sluice.gateway.ledger.exports import count_usage, export_usage
from sluice.gateway.ledger.legacy import Sealed, seal_legacy
from sluice.gateway.ledger.roles import RoleError, grant_app_role
from sluice.gateway.ledger.checkpoints import CheckpointFile
from sluice.gateway.ledger.verify import ChainSummary, VerifyReport, verify
from sluice.gateway.db.models import Tenant, to_utc
from sluice.gateway.db.session import create_engine
from sluice.gateway.settings import Settings

err = Console(stderr=True, soft_wrap=True)  # one message, one line
T = TypeVar("T")


class CliError(Exception):
    """A one-line reason to stop."""


def parse_time(text: str) -> dt.datetime:
    """``now``, an ISO date (midnight UTC) or an ISO datetime (naive means UTC)."""
    if text == "now":
        return dt.datetime.now(dt.UTC)
    try:
        ts = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or datetime: {text!r}") from None
    return to_utc(ts)


def register(subparsers: Any) -> None:
    audit = subparsers.add_parser("audit", help="audit log").add_subparsers(
        dest="action", required=True)  # fmt: skip
    p = audit.add_parser("verify", help="check every chain, the registry and the signed "
                         "checkpoints; exit 1 naming each finding")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.add_argument("--checkpoints", type=Path, action="append",
                   help="checkpoint file(s) to check against (default: this host's)")
    p.set_defaults(handler=cmd_audit_verify)
    p = audit.add_parser("seal-legacy", help="check and seal chains written before keyed "
                         "chains (once, right after upgrading)")  # fmt: skip
    p.add_argument("--checkpoints", type=Path, action="append")
    p.set_defaults(handler=cmd_audit_seal_legacy)

    db = subparsers.add_parser("db", help="database roles").add_subparsers(
        dest="action", required=True)  # fmt: skip
    p = db.add_parser("grant-app", help="(as the schema owner) give the gateway's role what "
                      "it needs and nothing that can switch the audit trigger off")  # fmt: skip
    p.add_argument("role")
    p.set_defaults(handler=cmd_db_grant_app)

    usage = subparsers.add_parser("usage", help="usage data").add_subparsers(
        dest="action", required=True)  # fmt: skip
    p = usage.add_parser("export", help="stream usage events as CSV or JSON lines")
    p.add_argument("--from", dest="start", type=parse_time, required=True, help="inclusive")
    p.add_argument("--to", dest="end", type=parse_time, default="now", help="exclusive")
    p.add_argument("--tenant", help="tenant name or id (default: all)")
    p.add_argument("--format", dest="fmt", choices=["csv", "jsonl"], default="csv")
    p.add_argument("--output", type=Path, help="file to write (default: stdout)")
    p.set_defaults(handler=cmd_usage_export)

    billing = subparsers.add_parser("billing", help="billing").add_subparsers(
        dest="action", required=True)  # fmt: skip
    p = billing.add_parser("push-stripe", help="send closed windows to Stripe Billing Meters")
    p.add_argument("--window", choices=["hour", "day"], default="hour")
    p.add_argument("--until", type=parse_time,
                   help="push windows closed by then (default: 5 minutes ago)")  # fmt: skip
    p.add_argument("--input-meter", help="default: SLUICE_STRIPE_INPUT_METER")
    p.add_argument("--output-meter", help="default: SLUICE_STRIPE_OUTPUT_METER")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_billing_push_stripe)


def _run(settings: Settings, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    async def main() -> T:
        engine = create_engine(settings.database_url)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


Handler = Callable[[argparse.Namespace, Settings], int]


def _guarded(handler: Handler) -> Handler:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        try:
            return handler(args, settings)
        except (CliError, BillingError, AuditKeyError, RoleError) as exc:
            err.print(f"[red]error:[/] {exc}", highlight=False)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            err.print(f"[red]error:[/] database: {reason}", highlight=False)
        except (ConnectionError, TimeoutError, socket.gaierror) as exc:
            err.print(f"[red]error:[/] database unreachable: {exc}", highlight=False)
        except OSError as exc:
            err.print(f"[red]error:[/] {exc}", highlight=False)
        return 2

    run.__name__ = handler.__name__
    return run


@_guarded
def cmd_audit_seal_legacy(args: argparse.Namespace, settings: Settings) -> int:
    key = audit_key(settings)
    files = args.checkpoints or [checkpoint_file(settings, key).path]
    known = {name for f in files for name in CheckpointFile(f, key).read().heads}

    async def work(engine: AsyncEngine) -> list[Sealed]:
        found = await seal_legacy(engine, key, known)
        audit = cli_audit(engine, settings)
        for s in found:
            await audit.record("cli", "audit.legacy_sealed", s.instance_id,
                               decision="refused" if s.problem else "sealed",
                               details={"legacy_until": s.legacy_until, "hash": s.hash_at_until,
                                        "problem": s.problem})  # fmt: skip
        return found

    found = _run(settings, work)
    for s in found:
        err.print(f"{'[red]not sealed' if s.problem else '[green]sealed'}:[/] {s.instance_id} "
                  f"{s.problem or f'(unkeyed records 1..{s.legacy_until})'}", highlight=False)
    return 1 if any(s.problem for s in found) else 0


@_guarded
def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    key = audit_key(settings)
    files = args.checkpoints or [checkpoint_file(settings, key).path]
    missing = [str(f) for f in files if not f.exists()]

    async def work(engine: AsyncEngine) -> VerifyReport:
        # One report per checkpoint file (one per replica's volume), merged per chain.
        chains: dict[str, ChainSummary] = {}
        problems: list[str] = []
        for path in files:
            report = await verify(engine, key, checkpoints=CheckpointFile(path, key))
            for chain in report.chains:
                known = chains.setdefault(chain.instance_id, chain)
                known.broken = known.broken or chain.broken
            problems += report.problems
        return VerifyReport(chains=[chains[n] for n in sorted(chains)], problems=problems)

    report = _run(settings, work)
    if args.json:
        print(json.dumps({
            "ok": report.ok,
            "records": report.records,
            "checkpoint_files_missing": missing,
            "problems": report.problems,
            "chains": [{"instance_id": c.instance_id, "records": c.records,
                        "last_seq": c.last_seq, "last_hash": c.last_hash,
                        "broken": None if c.broken is None else str(c.broken),
                        "reason": None if c.broken is None else c.broken.reason}
                       for c in report.chains],
        }))  # fmt: skip
    for path in missing:
        err.print(f"[yellow]no checkpoint file[/] {path}: tail cuts before the registry "
                  "cannot be checked against it", highlight=False)  # fmt: skip
    for link in report.breaks:
        err.print(f"[red]audit log tampered:[/] {link}", highlight=False)
    if report.ok and not args.json:
        err.print(f"[green]audit log intact:[/] {report.records} records in "
                  f"{len(report.chains)} chains")  # fmt: skip
    return 0 if report.ok else 1


async def _resolve_tenant(engine: AsyncEngine, name_or_id: str) -> str:
    async with engine.connect() as conn:
        found = (
            await conn.execute(
                select(Tenant.id).where(or_(Tenant.name == name_or_id, Tenant.id == name_or_id))
            )
        ).scalars().first()
    if found is None:
        raise CliError(f"no such tenant: {name_or_id}")
    return found


@_guarded
def cmd_usage_export(args: argparse.Namespace, settings: Settings) -> int:
    if args.end <= args.start:
        raise CliError("--to must be after --from")

    async def work(engine: AsyncEngine) -> int:
        tenant = None if args.tenant is None else await _resolve_tenant(engine, args.tenant)
        total = await count_usage(engine, start=args.start, end=args.end, tenant=tenant)
        progress = Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=err, transient=True)  # fmt: skip
        task = progress.add_task("export", total=total)
        # A file appears under its name only once complete; a failed export leaves none.
        partial = args.output.with_name(args.output.name + ".partial") if args.output else None
        target: Any = open(partial, "wb") if partial else nullcontext(sys.stdout.buffer)
        try:
            with target as out, progress:
                rows = await export_usage(
                    engine, start=args.start, end=args.end, tenant=tenant, fmt=args.fmt,
                    out=out, progress=lambda done: progress.update(task, completed=done),
                )
                out.flush()
        except BaseException:
            if partial:
                partial.unlink(missing_ok=True)
            raise
        if partial:
            os.replace(partial, args.output)
        audit = cli_audit(engine, settings)
        await audit.record("cli", "usage.export", tenant or "*", decision="ok", details={
            "from": args.start.isoformat(), "to": args.end.isoformat(), "format": args.fmt,
            "rows": rows, "output": str(args.output) if args.output else "stdout"})  # fmt: skip
        await audit.close()
        return rows

    rows = _run(settings, work)
    err.print(f"exported {rows} rows", highlight=False)
    return 0


@_guarded
def cmd_billing_push_stripe(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.stripe_api_key:
        raise CliError("STRIPE_API_KEY is not set")
    client = stripe_client(settings.stripe_api_key, api_base=settings.stripe_api_base)
    until = args.until or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    async def work(engine: AsyncEngine) -> Any:
        audit = cli_audit(engine, settings)
        try:
            return await push_stripe(
                engine, client, window=args.window, until=until,
                input_meter_event_name=args.input_meter or settings.stripe_input_meter,
                output_meter_event_name=args.output_meter or settings.stripe_output_meter,
                audit=audit, actor="cli",
            )  # fmt: skip
        finally:
            await audit.close()

    report = _run(settings, work)
    summary = {"windows": report.windows, "sent": report.sent,
               "already_present": report.already_present,
               "pushed_until": report.pushed_until.isoformat() if report.pushed_until else None}
    if args.json:
        print(json.dumps(summary))
    else:
        err.print(f"pushed {summary['windows']} windows: {report.sent} meter events sent, "
                  f"{report.already_present} already at Stripe; "
                  f"pushed until {summary['pushed_until'] or '(nothing to push)'}",
                  highlight=False)  # fmt: skip
    return 0


@_guarded
def cmd_db_grant_app(args: argparse.Namespace, settings: Settings) -> int:
    _run(settings, lambda engine: grant_app_role(engine, args.role))
    err.print(f"granted {args.role} the gateway's privileges", highlight=False)
    return 0
