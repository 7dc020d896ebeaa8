"""Traces (OpenTelemetry, GenAI semantic conventions) and Prometheus metrics.

One :class:`Telemetry` per app, kept in lifespan state: it owns its TracerProvider (never
installed globally) and its own CollectorRegistry, so two apps in one process, as in tests,
never share a series.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

# GenAI semantic-convention attribute names (opentelemetry-semantic-conventions, gen_ai.*).
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"

# LLM requests run from milliseconds (errors, cache hits) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
GUARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def gen_ai_attributes(
    *,
    model: str | None = None,
    operation: str | None = None,
    system: str | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    finish_reasons: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Span attributes under their GenAI semantic-convention names; ``None`` is left out."""
    attrs = {
        GEN_AI_REQUEST_MODEL: model,
        GEN_AI_OPERATION_NAME: operation,
        GEN_AI_SYSTEM: system,
        GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
        GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
        GEN_AI_RESPONSE_FINISH_REASONS: None if finish_reasons is None else list(finish_reasons),
    }
    return {k: v for k, v in attrs.items() if v is not None}


def _traces_url(endpoint: str) -> str:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` style base URL -> the OTLP/HTTP traces URL."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class Telemetry:
    def __init__(
        self,
        *,
        service_name: str = "sluice",
        otlp_endpoint: str | None = None,
        span_exporter: SpanExporter | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Tracing is on when ``otlp_endpoint`` (OTLP over HTTP, batched) or ``span_exporter``
        (exported synchronously: for tests) is given; otherwise spans are no-ops."""
        self.service_name = service_name
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if span_exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=_traces_url(otlp_endpoint))
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracing = span_exporter is not None or bool(otlp_endpoint)
        self.tracer: trace.Tracer = (
            self.provider.get_tracer("sluice.gateway") if self.tracing else trace.NoOpTracer()
        )
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[str, str, int], tuple[Any, ...]] = {}
        self._metrics()

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> Telemetry:
        """From any object with ``otlp_endpoint`` / ``service_name`` (missing: off / sluice)."""
        kwargs = {"otlp_endpoint": getattr(settings, "otlp_endpoint", None),
                  "service_name": getattr(settings, "service_name", None) or "sluice"}  # fmt: skip
        return cls(**{**kwargs, **overrides})

    def _metrics(self) -> None:
        reg, ns = self.registry, "sluice"
        self.requests = Counter("requests", "Requests answered", ["model", "status", "endpoint"],
                                namespace=ns, registry=reg)  # fmt: skip
        self.request_latency = Histogram(
            "request_latency_seconds", "Time from request to last byte", ["model", "endpoint"],
            buckets=LATENCY_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        self.ttft = Histogram("ttft_seconds", "Time to first token", ["model"],
                              buckets=TTFT_BUCKETS, namespace=ns, registry=reg)  # fmt: skip
        self.tokens = Counter("tokens", "Tokens metered", ["model", "kind"],
                              namespace=ns, registry=reg)  # fmt: skip
        self.queue_depth = Gauge("queue_depth", "Requests waiting for a worker", ["backend"],
                                 namespace=ns, registry=reg)  # fmt: skip
        self.pool_workers = Gauge("pool_workers", "Workers by state", ["backend", "state"],
                                  namespace=ns, registry=reg)  # fmt: skip
        self.cold_starts = Gauge("pool_cold_starts", "Cold starts since the gateway started",
                                 ["backend"], namespace=ns, registry=reg)  # fmt: skip
        self.last_cold_start = Gauge("pool_last_cold_start_seconds", "Duration of the last "
                                     "cold start", ["backend"], namespace=ns, registry=reg)
        self.wakes = Gauge("pool_wakes", "Wakes from sleep since the gateway started",
                           ["backend"], namespace=ns, registry=reg)  # fmt: skip
        self.last_wake = Gauge("pool_last_wake_seconds", "Duration of the last wake from sleep",
                               ["backend"], namespace=ns, registry=reg)  # fmt: skip
        self.guard_latency = Histogram(
            "guard_latency_seconds", "Guardrail check time", ["stage"],
            buckets=GUARD_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip

    # -- traces ----------------------------------------------------------------------------

    @contextmanager
    def span(self, name: str, attributes: dict[str, Any] | None = None, **attrs: Any) -> Iterator[
        trace.Span
    ]:
        """A span, child of the current one. Dotted names (``gen_ai.*``) go in ``attributes``
        (see :func:`gen_ai_attributes`), plain ones as keywords; ``None`` values are dropped.
        An exception marks the span as failed and propagates."""
        merged = {k: v for k, v in {**(attributes or {}), **attrs}.items() if v is not None}
        with self.tracer.start_as_current_span(name, attributes=merged) as span:
            yield span

    def shutdown(self) -> None:
        """Flush and stop exporting (app shutdown)."""
        self.provider.shutdown()

    # -- metrics ---------------------------------------------------------------------------

    def observe_request(
        self,
        *,
        model: str,
        endpoint: str,
        status: int,
        latency_s: float,
        ttft_s: float | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        # Label children cached per (model, endpoint, status): .labels() costs a lock and
        # a dict walk per metric per request.
        key = (model, endpoint, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(model=model, status=str(status), endpoint=endpoint),
                self.request_latency.labels(model=model, endpoint=endpoint),
                self.ttft.labels(model=model),
                self.tokens.labels(model=model, kind="prompt"),
                self.tokens.labels(model=model, kind="completion"),
            )
        requests, latency, ttft, prompt, completion = children
        requests.inc()
        latency.observe(latency_s)
        if ttft_s is not None:
            ttft.observe(ttft_s)
        if prompt_tokens:
            prompt.inc(prompt_tokens)
        if completion_tokens:
            completion.inc(completion_tokens)

    def set_queue_depth(self, backend: str, depth: int) -> None:
        self.queue_depth.labels(backend=backend).set(depth)

    def set_pool_workers(self, backend: str, state: str, count: int) -> None:
        """``state``: e.g. ``idle``, ``busy``, ``starting``."""
        self.pool_workers.labels(backend=backend, state=state).set(count)

    def set_pool_starts(self, backend: str, *, cold_starts: int, last_cold_start_s: float | None,
                        wakes: int, last_wake_s: float | None) -> None:
        self.cold_starts.labels(backend=backend).set(cold_starts)
        self.wakes.labels(backend=backend).set(wakes)
        if last_cold_start_s is not None:
            self.last_cold_start.labels(backend=backend).set(last_cold_start_s)
        if last_wake_s is not None:
            self.last_wake.labels(backend=backend).set(last_wake_s)

    def observe_guard(self, stage: str, seconds: float) -> None:
        """``stage``: ``input`` or ``output``."""
        self.guard_latency.labels(stage=stage).observe(seconds)

    def metrics_response(self) -> tuple[bytes, str]:
        """Body and content type for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
