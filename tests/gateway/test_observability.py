"""Traces of one request (in-memory exporter) and the Prometheus /metrics endpoint."""

from __future__ import annotations

import httpx
import openai
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sluice.gateway.telemetry import Telemetry
from tests.conftest import GatewayServer, echo_settings


def test_one_request_yields_nested_spans_with_token_counts(sqlite_url: str) -> None:
    exporter = InMemorySpanExporter()
    server = GatewayServer(echo_settings(sqlite_url),
                           telemetry=Telemetry(span_exporter=exporter)).start()
    try:
        api = openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.tenant_key(),
                            max_retries=0)
        reply = api.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "trace me please"}])
        spans = {s.name: s for s in exporter.get_finished_spans()}
        root = spans["POST /v1/chat/completions"]
        for child in ("auth", "ratelimit", "queue", "prefill", "decode", "metering"):
            assert spans[child].parent is not None, child
            assert spans[child].parent.span_id == root.context.span_id, child
            assert spans[child].context.trace_id == root.context.trace_id
        # guardrails are off here: no guard spans at all (issue 15)
        assert not {"guard.input", "guard.output"} & set(spans)
        attrs = root.attributes
        assert attrs["gen_ai.request.model"] == "echo"
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.provider.name"] == "sluice"
        assert attrs["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
        assert attrs["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens == 3
        assert list(attrs["gen_ai.response.finish_reasons"]) == ["stop"]
        assert spans["prefill"].end_time <= spans["decode"].start_time + 1
    finally:
        server.stop()


def test_metrics_endpoint_exposes_requests_tokens_and_pools(sqlite_server: GatewayServer) -> None:
    api = openai.OpenAI(base_url=sqlite_server.base_url + "/v1",
                        api_key=sqlite_server.tenant_key(), max_retries=0)
    for _ in range(3):
        api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}])
    text = httpx.get(sqlite_server.base_url + "/metrics").text
    assert 'sluice_requests_total{endpoint="chat",model="echo",status="200"} 3.0' in text
    assert 'sluice_tokens_total{kind="completion",model="echo"} 6.0' in text
    assert "sluice_ttft_seconds_bucket" in text
    assert 'sluice_pool_workers{backend="echo",state="ready"} 1.0' in text
    assert 'sluice_queue_depth{backend="echo"} 0.0' in text
    assert 'sluice_pool_cold_starts{backend="echo"} 1.0' in text
    assert 'sluice_pool_last_cold_start_seconds{backend="echo"}' in text
    assert 'sluice_pool_workers{backend="echo",state="sleeping"} 0.0' in text
