"""Traces (OpenTelemetry, GenAI semantic conventions); Prometheus metrics are metrics.py's.

One :class:`Telemetry` per app, kept in lifespan state: it owns its TracerProvider (never
installed globally) and its own CollectorRegistry, so two apps in one process, as in tests,
never share a series.

Names are the ``opentelemetry-semantic-conventions`` package's own: span attributes
``gen_ai.operation.name`` (``chat``, ``text_completion``, ``embeddings``),
``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.usage.*``; metrics
``gen_ai.client.token.usage``, ``gen_ai.server.request.duration``,
``gen_ai.server.time_to_first_token`` and ``gen_ai.server.time_per_output_token`` with the
buckets the conventions advise, exported to Prometheus under their dotted names with
dots as underscores (and ``_seconds`` for durations). W3C ``traceparent`` from the client
is the parent of the request span and goes on upstream (:func:`trace_headers`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from prometheus_client import CollectorRegistry

from sluice.gateway.metrics import OPERATIONS, Metrics

# GenAI semantic-convention names, from opentelemetry-semantic-conventions.
GEN_AI_SYSTEM = gen_ai.GEN_AI_SYSTEM  # deprecated for gen_ai.provider.name; not emitted
GEN_AI_PROVIDER_NAME = gen_ai.GEN_AI_PROVIDER_NAME
GEN_AI_OPERATION_NAME = gen_ai.GEN_AI_OPERATION_NAME
GEN_AI_REQUEST_MODEL = gen_ai.GEN_AI_REQUEST_MODEL
GEN_AI_RESPONSE_FINISH_REASONS = gen_ai.GEN_AI_RESPONSE_FINISH_REASONS
GEN_AI_USAGE_INPUT_TOKENS = gen_ai.GEN_AI_USAGE_INPUT_TOKENS
GEN_AI_USAGE_OUTPUT_TOKENS = gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS
GEN_AI_TOKEN_TYPE = gen_ai.GEN_AI_TOKEN_TYPE


def gen_ai_attributes(
    *,
    model: str | None = None,
    operation: str | None = None,
    system: str | None = None,
    provider: str | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    finish_reasons: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Span attributes under their GenAI semantic-convention names; ``None`` is left out.
    ``operation`` may be an endpoint (``completions`` -> ``text_completion``); ``system``
    is the older name of ``provider``."""
    attrs = {
        GEN_AI_REQUEST_MODEL: model,
        GEN_AI_OPERATION_NAME: OPERATIONS.get(operation, operation) if operation else None,
        GEN_AI_PROVIDER_NAME: provider or system,
        GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
        GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
        GEN_AI_RESPONSE_FINISH_REASONS: None if finish_reasons is None else list(finish_reasons),
    }
    return {k: v for k, v in attrs.items() if v is not None}


_PROPAGATOR = TraceContextTextMapPropagator()


def incoming_context(headers: Any) -> Any:
    """The client's W3C trace context (``traceparent``/``tracestate``), or None."""
    if "traceparent" not in headers:
        return None
    return _PROPAGATOR.extract(headers)


def trace_headers(headers: Any, span: Any = None) -> dict[str, str]:
    """W3C headers for an outgoing call: the request span's context when tracing, else the
    client's own ``traceparent``/``tracestate`` passed on unchanged."""
    if span is not None and span.get_span_context().is_valid:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier
    return {name: headers[name] for name in ("traceparent", "tracestate") if name in headers}


def _traces_url(endpoint: str) -> str:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` style base URL -> the OTLP/HTTP traces URL."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class Telemetry(Metrics):
    """Tracing (this module) and the Prometheus metrics it inherits (gateway/metrics.py)."""

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
        super().__init__(registry)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> Telemetry:
        """From any object with ``otlp_endpoint`` / ``service_name`` (missing: off / sluice)."""
        kwargs = {"otlp_endpoint": getattr(settings, "otlp_endpoint", None),
                  "service_name": getattr(settings, "service_name", None) or "sluice"}  # fmt: skip
        return cls(**{**kwargs, **overrides})

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

    def request_span(self, name: str, headers: Any) -> trace.Span:
        """A request's root span, child of the client's ``traceparent``; not current yet, and
        ended by whoever finishes the request. ``INVALID_SPAN`` (a no-op) when not tracing."""
        if not self.tracing:
            return trace.INVALID_SPAN
        return self.tracer.start_span(name, context=incoming_context(headers))

    @contextmanager
    def opening(self, span: trace.Span) -> Iterator[None]:
        """A request's opening (auth, parse, route) as the current span's work; if it fails,
        the failure is recorded on ``span`` and the span ends."""
        try:
            with trace.use_span(span, end_on_exit=False) if self.tracing else nullcontext():
                yield
        except BaseException:
            span.end()
            raise

    def shutdown(self) -> None:
        """Flush and stop exporting (app shutdown)."""
        self.provider.shutdown()
