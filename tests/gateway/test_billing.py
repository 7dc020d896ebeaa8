"""Usage exports and the Stripe push, against Postgres databases of their own.

A migrated template database is built once per module (real alembic migrations); each
test gets a fresh copy of it (``CREATE DATABASE ... TEMPLATE``) and drops it afterwards.
The Stripe side is tests/fakes/stripe_server.py, which validates every request against
Stripe's published OpenAPI document.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import hashlib
import io
import json
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sluice.gateway import cli_accounting
from sluice.gateway.ledger.audit import AuditLog
from sluice.gateway.ledger.billing import meter_identifier, push_stripe, stripe_client
from sluice.gateway.ledger.exports import (
    BillingError,
    count_usage,
    export_usage,
    iter_usage_export,
)
from sluice.gateway.ledger.verify import verify
from sluice.gateway.db.models import Tenant, UsageEvent
from sluice.gateway.db.session import create_engine, migrate
from sluice.gateway.settings import Settings
from tests.fakes.stripe_server import FakeStripe

PG_SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432"
T0 = dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


@pytest.fixture(scope="module")
async def template_db() -> AsyncIterator[str]:
    name = f"sluice_t_{secrets.token_hex(6)}_tmpl"
    admin = create_async_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        migrate(f"{PG_SERVER}/{name}")
        yield name
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture
async def db_url(template_db: str) -> AsyncIterator[str]:
    name = f"sluice_t_{secrets.token_hex(6)}"
    admin = create_async_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


async def seed(engine: AsyncEngine, usage: list[tuple[str, dt.datetime, int, int]]) -> None:
    """Tenants acme and globex bill through Stripe; hobby has no customer id."""
    async with engine.begin() as conn:
        await conn.execute(insert(Tenant), [
            {"id": "ten_acme", "name": "acme", "stripe_customer_id": "cus_acme"},
            {"id": "ten_globex", "name": "globex", "stripe_customer_id": "cus_globex"},
            {"id": "ten_hobby", "name": "hobby", "stripe_customer_id": None},
        ])  # fmt: skip
        await conn.execute(insert(UsageEvent), [
            {"request_id": f"req-{i}", "tenant_id": tenant, "key_id": "key_1", "model": "echo",
             "endpoint": "chat", "prompt_tokens": p, "completion_tokens": c, "status": 200,
             "finish_reason": "stop", "latency_ms": 12.5, "ttft_ms": 3.0, "created_at": at}
            for i, (tenant, at, p, c) in enumerate(usage)
        ])  # fmt: skip


USAGE = [
    ("ten_acme", T0 + dt.timedelta(minutes=5), 100, 10),
    ("ten_acme", T0 + dt.timedelta(minutes=59, seconds=59), 50, 5),
    ("ten_globex", T0 + dt.timedelta(minutes=30), 7, 0),  # no output tokens: no output event
    ("ten_hobby", T0 + dt.timedelta(minutes=1), 1000, 1000),  # not billed through Stripe
    ("ten_acme", T0 + HOUR, 1, 2),  # second window starts exactly here
    ("ten_globex", T0 + 3 * HOUR + dt.timedelta(minutes=1), 40, 4),  # after two empty hours
    ("ten_acme", T0 + 4 * HOUR + dt.timedelta(minutes=10), 9, 9),  # window still open
]
# (tenant, window start, meter) -> value, for windows closed by T0 + 4h30m.
EXPECTED = {
    ("ten_acme", T0, "in_tok"): 150, ("ten_acme", T0, "out_tok"): 15,
    ("ten_globex", T0, "in_tok"): 7,
    ("ten_acme", T0 + HOUR, "in_tok"): 1, ("ten_acme", T0 + HOUR, "out_tok"): 2,
    ("ten_globex", T0 + 3 * HOUR, "in_tok"): 40, ("ten_globex", T0 + 3 * HOUR, "out_tok"): 4,
}  # fmt: skip
CUSTOMERS = {"ten_acme": "cus_acme", "ten_globex": "cus_globex"}


def billed(fake: FakeStripe) -> dict[tuple[str, int, str], int]:
    """What the fake Stripe holds, as (customer, timestamp, meter) -> value."""
    return {(e["payload"]["stripe_customer_id"], e["timestamp"], e["event_name"]):
            int(e["payload"]["value"]) for e in fake.events.values()}  # fmt: skip


def expected_billed() -> dict[tuple[str, int, str], int]:
    return {(CUSTOMERS[t], int(start.timestamp()), m): v for (t, start, m), v in EXPECTED.items()}


async def push(engine: AsyncEngine, fake: FakeStripe, **kw: object):  # type: ignore[no-untyped-def]
    client = stripe_client("sk_test_fake", api_base=fake.url, max_network_retries=kw.pop(
        "max_network_retries", 0))  # type: ignore[arg-type]  # fmt: skip
    args = {"window": "hour", "until": T0 + 4 * HOUR + dt.timedelta(minutes=30),
            "input_meter_event_name": "in_tok", "output_meter_event_name": "out_tok",
            "base_delay_s": 0.01, **kw}  # fmt: skip
    return await push_stripe(engine, client, **args)  # type: ignore[arg-type]


# -- exports -------------------------------------------------------------------------------


async def test_export_csv_and_jsonl_filter_by_time_and_tenant(db: AsyncEngine) -> None:
    await seed(db, USAGE)
    start, end = T0, T0 + HOUR  # end is exclusive: the event at T0 + 1h is left out
    buf = io.BytesIO()
    seen: list[int] = []
    rows = await export_usage(db, start=start, end=end, fmt="csv", out=buf, progress=seen.append,
                              chunk_rows=2)  # fmt: skip
    table = list(csv.DictReader(io.StringIO(buf.getvalue().decode())))
    assert rows == 4 and seen == [2, 4]
    assert [r["request_id"] for r in table] == ["req-0", "req-1", "req-2", "req-3"]
    assert table[0]["created_at"] == "2026-03-01T10:05:00.000000Z"
    assert table[0]["total_tokens"] == "110" and table[0]["ttft_ms"] == "3.0"

    chunks: list[bytes] = []

    async def consume(chunk: bytes) -> None:
        chunks.append(chunk)

    n = await export_usage(db, start=start, end=T0 + 5 * HOUR, tenant="ten_acme", fmt="jsonl",
                           out=consume)  # fmt: skip
    lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
    assert n == 4 == await count_usage(db, start=start, end=T0 + 5 * HOUR, tenant="ten_acme")
    assert {line["tenant_id"] for line in lines} == {"ten_acme"}
    assert [line["prompt_tokens"] for line in lines] == [100, 50, 1, 9]
    streamed = b"".join([c async for c in iter_usage_export(
        db, start=start, end=T0 + 5 * HOUR, tenant="ten_acme", fmt="jsonl")])  # fmt: skip
    assert streamed == b"".join(chunks)


# Runs in a child process so that the peak RSS it reports belongs to the export alone.
MEASURE_EXPORT = """
import asyncio, datetime as dt, hashlib, json, os, resource, sys, time
from sluice.gateway.ledger.exports import export_usage
from sluice.gateway.db.session import create_engine

PAGE = os.sysconf("SC_PAGE_SIZE")

def rss():  # resident bytes now (ru_maxrss only knows the peak since start-up)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

class Sink:  # keeps nothing: counts and hashes what it is given
    def __init__(self):
        self.bytes, self.lines, self.digest = 0, 0, hashlib.sha256()
    def write(self, chunk):
        self.bytes += len(chunk)
        self.lines += chunk.count(b"\\n")
        self.digest.update(chunk)

async def main(url, start, end):
    engine = create_engine(url)
    async with engine.connect() as conn:  # connect and warm up before the baseline
        await conn.exec_driver_sql("SELECT 1")
    sink, samples = Sink(), []
    before = rss()
    started = time.perf_counter()
    rows = await export_usage(engine, start=dt.datetime.fromisoformat(start),
                              end=dt.datetime.fromisoformat(end), fmt="csv", out=sink,
                              progress=lambda done: samples.append(rss()))
    seconds = time.perf_counter() - started
    await engine.dispose()
    print(json.dumps({"rows": rows, "lines": sink.lines, "bytes": sink.bytes,
                      "seconds": seconds, "rss_before": before, "rss_peak": max(samples),
                      "samples": len(samples),
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.slow
async def test_export_of_a_million_rows_runs_in_constant_memory(db: AsyncEngine, db_url) -> None:
    n = 1_000_000
    async with db.begin() as conn:
        await conn.execute(text(
            "INSERT INTO usage_events (request_id, tenant_id, key_id, model, endpoint, "
            "prompt_tokens, completion_tokens, status, finish_reason, latency_ms, ttft_ms, "
            "created_at) SELECT 'req-' || g, 'ten_' || (g % 7), 'key_' || (g % 31), "
            "'tiny-mixtral', 'chat', g % 1000, g % 100, 200, 'stop', 10.5, 2.25, "
            "CAST(:t0 AS timestamptz) + g * interval '1 millisecond' "
            "FROM generate_series(1, :n) AS g"
        ), {"t0": T0, "n": n})  # fmt: skip
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MEASURE_EXPORT, db_url, T0.isoformat(), (T0 + 2 * HOUR).isoformat(),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await child.communicate()
    assert child.returncode == 0
    m = json.loads(out)
    growth = m["rss_peak"] - m["rss_before"]
    print(f"\nexport: {m['rows']} rows, {m['bytes'] / 2**20:.1f} MiB CSV in {m['seconds']:.1f} s; "
          f"RSS {m['rss_before'] / 2**20:.1f} MiB before, peak {m['rss_peak'] / 2**20:.1f} MiB "
          f"over {m['samples']} samples (growth {growth / 2**20:.1f} MiB); "
          f"process ru_maxrss {m['ru_maxrss'] / 2**20:.1f} MiB")
    assert m["rows"] == n and m["lines"] == n + 1  # + header
    assert growth < 32 * 2**20 < m["bytes"]  # bounded, and far below the export's own size


# -- Stripe ---------------------------------------------------------------------------------


async def test_push_sends_each_closed_window_once_and_rerun_sends_nothing(db, fake) -> None:
    await seed(db, USAGE)
    first = await push(db, fake)
    assert billed(fake) == expected_billed()
    assert first.sent == 7 and first.pushed_until == T0 + 4 * HOUR
    assert fake.invalid == [] and len(fake.requests) == 7
    for e in fake.events.values():  # the deterministic identifier, window start as timestamp
        tenant = next(t for t, c in CUSTOMERS.items() if c == e["payload"]["stripe_customer_id"])
        start = dt.datetime.fromtimestamp(e["timestamp"], dt.UTC)
        assert e["identifier"] == meter_identifier(tenant, "hour", start, e["event_name"])

    again = await push(db, fake)
    assert (again.sent, again.windows, len(fake.requests)) == (0, 0, 7)
    later = await push(db, fake, until=T0 + 6 * HOUR)  # the open window has closed
    assert later.sent == 2 and len(fake.events) == 9 and fake.invalid == []


@pytest.mark.parametrize("keys_expired", [False, True])
async def test_lost_answer_mid_push_then_rerun_bills_each_event_once(db, fake, keys_expired):
    await seed(db, USAGE)
    # Third event: Stripe stores it, then the connection dies before the answer arrives;
    # with retries off, the push stops there, like a crashed gateway.
    fake.inject("ok", "ok", "drop_after_commit")
    with pytest.raises(BillingError, match="unavailable"):
        await push(db, fake, max_attempts=1)
    assert len(fake.events) == 3
    if keys_expired:  # Stripe forgets idempotency keys after 24 h; identifiers still dedupe
        fake.forget_idempotency_keys()

    report = await push(db, fake)
    # Within 24 h Stripe replays the saved answer for the same idempotency key ("sent");
    # later the identifier makes Stripe refuse the resend ("already present").
    assert (report.sent, report.already_present) == ((4, 1) if keys_expired else (5, 0))
    assert billed(fake) == expected_billed() and fake.invalid == []


async def test_crash_before_stripe_commits_resends_on_rerun(db, fake) -> None:
    await seed(db, USAGE)
    fake.inject("ok", "ok", "ok", "ok", "drop")  # the fifth never reaches Stripe's storage
    with pytest.raises(BillingError):
        await push(db, fake, max_attempts=1)
    assert len(fake.events) == 4
    report = await push(db, fake)
    assert (report.sent, report.already_present) == (3, 0)
    assert billed(fake) == expected_billed()


async def test_rate_limits_and_server_errors_back_off_and_deliver(db, fake) -> None:
    await seed(db, USAGE)
    fake.inject("429", "500", "429", "ok", "500", "drop")
    report = await push(db, fake)
    assert report.sent == 7 and billed(fake) == expected_billed()
    assert len(fake.requests) == 7 + 5 and fake.invalid == []


async def test_sdk_retries_server_errors_with_the_same_idempotency_key(db, fake) -> None:
    await seed(db, USAGE)
    fake.inject("500")
    report = await push(db, fake, max_network_retries=1, max_attempts=1)
    assert report.sent == 7 and billed(fake) == expected_billed()


async def test_changing_the_window_size_is_refused(db, fake) -> None:
    await seed(db, USAGE)
    await push(db, fake)
    with pytest.raises(BillingError, match="would bill usage twice"):
        await push(db, fake, window="day", until=T0 + 48 * HOUR)


async def test_each_push_is_an_audit_event(db, fake) -> None:
    await seed(db, USAGE)
    audit = AuditLog(db, "billing-test", key=AUDIT_KEY)
    await push(db, fake, audit=audit)
    await audit.close()
    async with db.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT target, decision, details FROM audit_log WHERE action = 'billing.stripe_push'"
        ))).all()  # fmt: skip
    assert len(rows) == 7 and {r.decision for r in rows} == {"sent"}
    assert {r.details["identifier"] for r in rows} == set(fake.events)
    assert (await verify(db, AUDIT_KEY)).ok


def test_fake_rejects_requests_that_break_the_schema(fake: FakeStripe) -> None:
    auth = {"Authorization": "Bearer sk_test_x"}
    post = lambda data, path="/v1/billing/meter_events": httpx.post(  # noqa: E731
        fake.url + path, data=data, headers=auth)
    assert post({"payload[value]": "1"}).status_code == 400  # no event_name
    assert post({"event_name": "e", "payload[value]": "1", "colour": "red"}).status_code == 400
    assert post({"event_name": "e", "payload[value]": "1", "timestamp": "soon"}).status_code == 400
    assert post({"event_name": "e" * 101, "payload[value]": "1"}).status_code == 400
    assert post({"event_name": "e", "payload[v]": "1"}, "/v1/billing/meters").status_code == 404
    assert len(fake.invalid) == 4
    ok = post({"event_name": "e", "payload[value]": "1", "identifier": "x", "timestamp": "5"})
    assert ok.status_code == 200 and ok.json()["timestamp"] == 5
    dup = post({"event_name": "e", "payload[value]": "1", "identifier": "x"})
    assert dup.status_code == 400 and dup.json()["error"]["code"] == "resource_already_exists"


# -- CLI ------------------------------------------------------------------------------------


AUDIT_KEY = b"k" * 32


def cli_settings(db_url: str, tmp: pytest.TempPathFactory, **stripe: str) -> Settings:
    state = tmp.mktemp("state")  # the CLI's audit checkpoints go there, not in the checkout
    return Settings(database_url=db_url, audit_key=AUDIT_KEY.decode(), spool_dir=state / "spool",
                    **stripe)


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sluice")
    cli_accounting.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


async def test_cli_usage_export_writes_a_file(db, db_url, tmp_path: Path, tmp_path_factory,
                                              capsys) -> None:
    await seed(db, USAGE)
    out = tmp_path / "usage.jsonl"
    args = cli(["usage", "export", "--from", "2026-03-01T10:00:00Z", "--to", "2026-03-02",
                "--tenant", "globex", "--format", "jsonl", "--output", str(out)])  # fmt: skip
    code = await _in_thread(args.handler, args, cli_settings(db_url, tmp_path_factory))
    assert code == 0 and "exported 2 rows" in capsys.readouterr().err
    assert [json.loads(x)["request_id"] for x in out.read_text().splitlines()] == ["req-2", "req-5"]
    assert list(tmp_path.iterdir()) == [out]  # the .partial file was renamed into place

    bad = cli(["usage", "export", "--from", "2026-03-01", "--tenant", "nobody"])
    assert await _in_thread(bad.handler, bad, cli_settings(db_url, tmp_path_factory)) == 2
    assert capsys.readouterr().err.strip() == "error: no such tenant: nobody"


async def test_cli_push_stripe(db, db_url, fake, tmp_path_factory, capsys) -> None:
    await seed(db, USAGE)
    stripe = {"stripe_api_key": "sk_test_cli", "stripe_api_base": fake.url}
    args = cli(["billing", "push-stripe", "--until", "2026-03-01T14:30:00Z", "--input-meter",
                "in_tok", "--output-meter", "out_tok", "--json"])  # fmt: skip
    assert await _in_thread(args.handler, args, cli_settings(db_url, tmp_path_factory,
                                                             **stripe)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sent"] == 7 and billed(fake) == expected_billed()

    assert await _in_thread(args.handler, args, cli_settings(db_url, tmp_path_factory)) == 2
    assert "STRIPE_API_KEY is not set" in capsys.readouterr().err


async def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    """CLI handlers call asyncio.run(); keep them off the test's event loop."""
    return await asyncio.to_thread(fn, *args)
