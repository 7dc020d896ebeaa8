"""Telemetry: nested GenAI spans of one request, Prometheus metrics, OTLP export."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as semconv
from opentelemetry.trace import StatusCode
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from sluice.gateway import telemetry as tm
from sluice.gateway.telemetry import Telemetry, gen_ai_attributes

STAGES = ["auth", "ratelimit", "guard", "queue", "prefill", "decode", "metering"]


def fake_request(t: Telemetry) -> None:
    with t.span("chat tiny-mixtral", gen_ai_attributes(
        model="tiny-mixtral", operation="chat", system="sluice"), **{"http.route": "/v1/chat"},
    ) as request:  # fmt: skip
        for stage in STAGES:
            with t.span(stage, tokens=12 if stage == "prefill" else None):
                pass
        request.set_attributes(gen_ai_attributes(input_tokens=12, output_tokens=5,
                                                 finish_reasons=["stop"]))  # fmt: skip


def test_attribute_names_are_the_semantic_conventions() -> None:
    assert (tm.GEN_AI_REQUEST_MODEL, tm.GEN_AI_USAGE_INPUT_TOKENS, tm.GEN_AI_USAGE_OUTPUT_TOKENS,
            tm.GEN_AI_RESPONSE_FINISH_REASONS, tm.GEN_AI_SYSTEM, tm.GEN_AI_OPERATION_NAME) == (
        semconv.GEN_AI_REQUEST_MODEL, semconv.GEN_AI_USAGE_INPUT_TOKENS,
        semconv.GEN_AI_USAGE_OUTPUT_TOKENS, semconv.GEN_AI_RESPONSE_FINISH_REASONS,
        semconv.GEN_AI_SYSTEM, semconv.GEN_AI_OPERATION_NAME)  # fmt: skip


def test_request_span_with_one_child_per_stage() -> None:
    exporter = InMemorySpanExporter()
    fake_request(Telemetry(span_exporter=exporter, service_name="sluice-test"))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request = spans.pop("chat tiny-mixtral")
    assert request.parent is None
    assert request.resource.attributes["service.name"] == "sluice-test"
    assert dict(request.attributes) == {
        "gen_ai.request.model": "tiny-mixtral", "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "sluice", "http.route": "/v1/chat", "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 5, "gen_ai.response.finish_reasons": ("stop",),
    }  # fmt: skip
    assert sorted(spans) == sorted(STAGES)
    for child in spans.values():
        assert child.parent.span_id == request.context.span_id
        assert child.context.trace_id == request.context.trace_id
    assert spans["prefill"].attributes["tokens"] == 12
    assert "tokens" not in spans["decode"].attributes
    starts = [spans[s].start_time for s in STAGES]
    assert starts == sorted(starts) and spans["metering"].end_time <= request.end_time


def test_failed_stage_marks_its_span_and_the_request() -> None:
    exporter = InMemorySpanExporter()
    t = Telemetry(span_exporter=exporter)
    with pytest.raises(TimeoutError):
        with t.span("request"), t.span("queue", backend="local"):
            raise TimeoutError("queue timeout")
    queue, request = exporter.get_finished_spans()
    assert queue.status.status_code is StatusCode.ERROR is request.status.status_code
    assert queue.events[0].name == "exception"
    assert queue.events[0].attributes["exception.type"] == "TimeoutError"


def test_tracing_off_by_default_costs_nothing_and_records_nothing() -> None:
    t = Telemetry()
    with t.span("request") as span:
        assert not span.is_recording()


def test_metrics_in_own_registry() -> None:
    a, b = Telemetry(), Telemetry()  # no "Duplicated timeseries": each has its own registry
    a.observe_request(model="tiny-mixtral", endpoint="chat", status=200, latency_s=0.3,
                      ttft_s=0.02, prompt_tokens=12, completion_tokens=5)  # fmt: skip
    a.observe_request(model="tiny-mixtral", endpoint="chat", status=429, latency_s=0.001)
    a.set_queue_depth("local", 3)
    a.set_pool_workers("local", "busy", 2)
    a.set_pool_workers("local", "idle", 1)
    a.observe_guard("input", 0.004)
    body, content_type = a.metrics_response()
    assert content_type.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    chat = {"model": "tiny-mixtral", "endpoint": "chat"}
    assert value("sluice_requests_total", status="200", **chat) == 1
    assert value("sluice_requests_total", status="429", **chat) == 1
    assert value("sluice_request_latency_seconds_count", **chat) == 2
    assert value("sluice_ttft_seconds_count", model="tiny-mixtral") == 1
    assert value("sluice_tokens_total", model="tiny-mixtral", kind="prompt") == 12
    assert value("sluice_tokens_total", model="tiny-mixtral", kind="completion") == 5
    assert value("sluice_queue_depth", backend="local") == 3
    assert value("sluice_pool_workers", backend="local", state="busy") == 2
    assert value("sluice_guard_latency_seconds_bucket", stage="input", le="0.005") == 1
    other = text_string_to_metric_families(b.metrics_response()[0].decode())
    assert [s for fam in other for s in fam.samples] == []
    assert REGISTRY.get_sample_value("sluice_requests_total", {"model": "tiny-mixtral",
        "status": "200", "endpoint": "chat"}) is None  # fmt: skip


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A local OTLP/HTTP receiver that keeps what it is sent."""
    received: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_otlp_http_export(collector: tuple[str, list[tuple[str, str, bytes]]]) -> None:
    url, received = collector
    t = Telemetry.from_settings(type("S", (), {"otlp_endpoint": url})())
    fake_request(t)
    t.shutdown()  # flushes the batch processor
    path, content_type, body = received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    assert b"chat tiny-mixtral" in body and b"gen_ai.usage.output_tokens" in body


def test_gen_ai_metrics_under_the_conventions_names() -> None:
    from opentelemetry.semconv._incubating.metrics import gen_ai_metrics

    t = Telemetry()
    t.observe_request(model="m", endpoint="completions", status=200, latency_s=0.5,
                      ttft_s=0.1, prompt_tokens=10, completion_tokens=5, provider="openai")
    families = {f.name: f for f in text_string_to_metric_families(
        t.metrics_response()[0].decode())}
    tokens = families[gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE.replace(".", "_")]
    sums = {s.labels["gen_ai_token_type"]: s.value for s in tokens.samples
            if s.name.endswith("_sum")}
    assert sums == {"input": 10, "output": 5}
    assert {s.labels["gen_ai_operation_name"] for s in tokens.samples} == {"text_completion"}
    for name in (gen_ai_metrics.GEN_AI_SERVER_REQUEST_DURATION,
                 gen_ai_metrics.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
                 gen_ai_metrics.GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN):
        assert name.replace(".", "_") + "_seconds" in families


def test_traceparent_is_read_and_passed_on() -> None:
    incoming = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    # tracing off: the client's own header goes on unchanged
    assert tm.trace_headers(incoming) == incoming
    # tracing on: the request span is the client's span's child, and its context goes on
    exporter = InMemorySpanExporter()
    t = Telemetry(span_exporter=exporter)
    span = t.tracer.start_span("POST /v1/chat/completions",
                               context=tm.incoming_context(incoming))
    out = tm.trace_headers(incoming, span)
    span.end()
    assert out["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert out["traceparent"].split("-")[2] == format(span.get_span_context().span_id, "016x")
    assert exporter.get_finished_spans()[0].parent.span_id == 0x00f067aa0ba902b7
