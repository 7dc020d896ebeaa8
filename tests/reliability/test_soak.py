"""Soak: a fixed request rate for a set time against `sluice serve` on Postgres.

Zero errors, every usage row equal to what its client received, and the gateway's RSS
flat. Short by default (~20 s); ``SLUICE_RELIABILITY_FULL=1`` runs 10 minutes, or set
``SLUICE_SOAK_S`` / ``SLUICE_SOAK_RATE`` directly.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx

from tests.conftest import ProcessServer, drop_postgres_database, make_postgres_database
from tests.reliability.support import (
    daily_totals,
    duration,
    report,
    rss_mb,
    run_load,
    wait_for_rows,
)

# RSS may grow this much from the post-warm-up baseline (allocator arenas settle in the
# first minutes); a leak of even 1 KiB per request passes 12 MiB in the full soak.
RSS_SLACK_MB = 40.0
RSS_SLACK_FRACTION = 0.25


def test_soak_fixed_rate(tmp_path: Path) -> None:
    seconds = duration(20, 600, "SLUICE_SOAK_S")
    rate = float(os.environ.get("SLUICE_SOAK_RATE", "20"))
    url = make_postgres_database("sluice_soak")
    server = ProcessServer(url, tmp_path)
    try:
        server.wait_ready()
        keys = asyncio.run(_keys(server))
        # Warm-up: cold-start the pool and fill caches before the RSS baseline is taken.
        warm = asyncio.run(run_load(server.base_url, keys, rate=50, duration_s=2))
        assert not warm.failures(), warm.failures()[:3]
        rss_start = rss_mb(server.proc.pid)
        samples: list[tuple[float, float]] = [(0.0, rss_start)]

        def sample(t: float) -> None:
            if t - samples[-1][0] >= 5:
                samples.append((t, rss_mb(server.proc.pid)))

        load = asyncio.run(run_load(server.base_url, keys, rate=rate, duration_s=seconds,
                                    on_tick=sample))
        rss_end = rss_mb(server.proc.pid)
        rss_peak = max(max(s for _, s in samples), rss_end)
        metrics = httpx.get(server.base_url + "/metrics").text

        sent = warm.outcomes + load.outcomes
        rows = asyncio.run(wait_for_rows(url, len(sent), timeout_s=60))
        daily = asyncio.run(daily_totals(url))
        failures = [o for o in sent if o.status != 200 or o.error]
        client_prompt = sum(o.prompt_tokens for o in sent)
        client_completion = sum(o.completion_tokens for o in sent)
        lost = {o.request_id for o in sent} - rows.keys()
        mismatched = [o.request_id for o in sent if o.request_id in rows
                      and rows[o.request_id][:2] != (o.prompt_tokens, o.completion_tokens)]
        report(
            "soak", duration_s=round(load.elapsed_s, 1), rate_rps=rate,
            requests=len(load.outcomes), warmup_requests=len(warm.outcomes),
            errors=len(failures), usage_rows=len(rows), lost_events=len(lost),
            mismatched_rows=len(mismatched),
            client_tokens=[client_prompt, client_completion], daily_totals=list(daily),
            rss_start_mb=round(rss_start, 1), rss_peak_mb=round(rss_peak, 1),
            rss_end_mb=round(rss_end, 1),
            rss_samples_mb=[round(s, 1) for _, s in samples[:: max(1, len(samples) // 12)]],
        )
        assert not failures, failures[:3]
        assert not lost and not mismatched
        assert len(rows) == len(sent)  # nothing doubled, nothing from elsewhere
        assert daily == (len(sent), client_prompt, client_completion)
        assert rss_end <= max(rss_start + RSS_SLACK_MB, rss_start * (1 + RSS_SLACK_FRACTION))
        assert 'sluice_requests_total{endpoint="chat"' in metrics
    finally:
        server.stop()
        drop_postgres_database(url)


async def _keys(server: ProcessServer) -> list[str]:
    """Three tenants with two keys each; the load spreads over all six."""
    keys = []
    for tenant in ("soak-a", "soak-b", "soak-c"):
        for _ in range(2):
            keys.append(await server.tenant_key(tenant))
    return keys
