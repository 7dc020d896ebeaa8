"""Prometheus metrics: the gateway's own series and the GenAI semantic-convention ones.

Each :class:`Metrics` has its own CollectorRegistry, so two apps in one process, as in
tests, never share a series. GenAI metrics (``gen_ai.client.token.usage``,
``gen_ai.server.request.duration``, ``gen_ai.server.time_to_first_token``,
``gen_ai.server.time_per_output_token``) use the buckets the conventions advise and are
exported under their dotted names with dots as underscores (and ``_seconds`` for
durations). Tracing is telemetry.py's; :class:`~sluice.gateway.telemetry.Telemetry` is both.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

#: The gateway's endpoints as GenAI operation names.
OPERATIONS = {
    "chat": gen_ai.GenAiOperationNameValues.CHAT.value,
    "completions": gen_ai.GenAiOperationNameValues.TEXT_COMPLETION.value,
    "embeddings": gen_ai.GenAiOperationNameValues.EMBEDDINGS.value,
}
# Bucket boundaries the GenAI metric conventions advise.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                       2.5, 5.0, 7.5, 10.0)
PER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

# LLM requests run from milliseconds (errors, cache hits) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
GUARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[str, str, int], tuple[Any, ...]] = {}
        self._metrics()

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
        self.device_workers = Gauge("pool_device_workers", "Workers by device and state (data-parallel "
                                    "pools)", ["backend", "device", "state"], namespace=ns, registry=reg)
        self.cold_starts = Gauge("pool_cold_starts", "Cold starts since the gateway started",
                                 ["backend"], namespace=ns, registry=reg)  # fmt: skip
        self.last_cold_start = Gauge("pool_last_cold_start_seconds", "Duration of the last "
                                     "cold start", ["backend"], namespace=ns, registry=reg)
        self.wakes = Gauge("pool_wakes", "Wakes from sleep since the gateway started",
                           ["backend"], namespace=ns, registry=reg)  # fmt: skip
        self.last_wake = Gauge("pool_last_wake_seconds", "Duration of the last wake from sleep",
                               ["backend"], namespace=ns, registry=reg)  # fmt: skip
        self.transitions = Gauge("pool_transitions", "Transitions (start, wake, sleep, stop) "
                                 "completed", ["backend", "kind"], namespace=ns, registry=reg)
        self.transition_last = Gauge("pool_transition_last_seconds", "Duration of the last "
                                     "transition of each kind", ["backend", "kind"], namespace=ns,
                                     registry=reg)
        self.guard_latency = Histogram(
            "guard_latency_seconds", "Guardrail check time", ["stage"],
            buckets=GUARD_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        # GenAI metrics under the conventions' names (dots -> underscores for Prometheus).
        labels = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
        self.gen_ai_tokens = Histogram(
            _prom(gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE), "Tokens used per operation",
            [*labels, "gen_ai_token_type"], buckets=TOKEN_BUCKETS, registry=reg)
        self.gen_ai_duration = Histogram(
            _prom(gen_ai_metrics.GEN_AI_SERVER_REQUEST_DURATION), "Request duration",
            [*labels, "error_type"], unit="seconds", buckets=DURATION_BUCKETS, registry=reg)
        self.gen_ai_ttft = Histogram(
            _prom(gen_ai_metrics.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN), "Time to first token",
            labels, unit="seconds", buckets=FIRST_TOKEN_BUCKETS, registry=reg)
        self.gen_ai_per_token = Histogram(
            _prom(gen_ai_metrics.GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN),
            "Time per output token after the first", labels, unit="seconds",
            buckets=PER_TOKEN_BUCKETS, registry=reg)

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
        provider: str = "sluice",
    ) -> None:
        # Label children cached per (model, endpoint, status): .labels() costs a lock and
        # a dict walk per metric per request.
        key = (model, endpoint, status, provider)
        children = self._children.get(key)
        if children is None:
            operation = OPERATIONS.get(endpoint, endpoint)
            gen_ai_labels = (operation, provider, model)
            children = self._children[key] = (
                self.requests.labels(model=model, status=str(status), endpoint=endpoint),
                self.request_latency.labels(model=model, endpoint=endpoint),
                self.ttft.labels(model=model),
                self.tokens.labels(model=model, kind="prompt"),
                self.tokens.labels(model=model, kind="completion"),
                self.gen_ai_tokens.labels(*gen_ai_labels, "input"),
                self.gen_ai_tokens.labels(*gen_ai_labels, "output"),
                self.gen_ai_duration.labels(*gen_ai_labels,
                                            "" if status < 400 else str(status)),
                self.gen_ai_ttft.labels(*gen_ai_labels),
                self.gen_ai_per_token.labels(*gen_ai_labels),
            )
        (requests, latency, ttft, prompt, completion, gen_in, gen_out, duration, first_token,
         per_token) = children
        requests.inc()
        latency.observe(latency_s)
        duration.observe(latency_s)
        if ttft_s is not None:
            ttft.observe(ttft_s)
            first_token.observe(ttft_s)
            if completion_tokens > 1:
                per_token.observe((latency_s - ttft_s) / (completion_tokens - 1))
        if prompt_tokens:
            prompt.inc(prompt_tokens)
        if completion_tokens:
            completion.inc(completion_tokens)
        if status < 400:
            gen_in.observe(prompt_tokens)
            if endpoint != "embeddings":
                gen_out.observe(completion_tokens)

    def set_queue_depth(self, backend: str, depth: int) -> None:
        self.queue_depth.labels(backend=backend).set(depth)

    def set_pool_workers(self, backend: str, state: str, count: int) -> None:
        """``state``: e.g. ``idle``, ``busy``, ``starting``."""
        self.pool_workers.labels(backend=backend, state=state).set(count)

    def set_device_workers(self, backend: str, device: str, state: str, count: int) -> None:
        self.device_workers.labels(backend=backend, device=device, state=state).set(count)

    def set_pool_starts(self, backend: str, *, cold_starts: int, last_cold_start_s: float | None,
                        wakes: int, last_wake_s: float | None) -> None:
        self.cold_starts.labels(backend=backend).set(cold_starts)
        self.wakes.labels(backend=backend).set(wakes)
        if last_cold_start_s is not None:
            self.last_cold_start.labels(backend=backend).set(last_cold_start_s)
        if last_wake_s is not None:
            self.last_wake.labels(backend=backend).set(last_wake_s)

    def set_pool_transitions(self, backend: str, transitions: dict[str, Any]) -> None:
        """``transitions``: the pool status's record (kind -> count, last_s, ...)."""
        for kind in ("start", "wake", "sleep", "stop"):
            record = transitions.get(kind) or {}
            self.transitions.labels(backend=backend, kind=kind).set(record.get("count", 0))
            if record.get("last_s") is not None:
                self.transition_last.labels(backend=backend, kind=kind).set(record["last_s"])

    def observe_guard(self, stage: str, seconds: float) -> None:
        """``stage``: ``input`` or ``output``."""
        self.guard_latency.labels(stage=stage).observe(seconds)

    def metrics_response(self) -> tuple[bytes, str]:
        """Body and content type for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _prom(name: str) -> str:
    """A semantic-convention metric name as Prometheus spells it."""
    return name.replace(".", "_")
