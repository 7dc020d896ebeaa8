"""The end of a call, however it ends (finished, refused, failed, client gone): exactly one
usage record, the rate limit settled, metrics observed and the trace closed."""

from __future__ import annotations

import datetime as dt
import time

from opentelemetry import trace

from sluice.gateway.ledger.metering import Meter, UsageRecord
from sluice.gateway.pipeline.call import Call
from sluice.gateway.pipeline.spend import Spend
from sluice.gateway.pipeline.stages import RateLimitStage
from sluice.gateway.telemetry import Telemetry, gen_ai_attributes


class Recorder:
    def __init__(self, meter: Meter, ratelimit: RateLimitStage, spend: Spend,
                 telemetry: Telemetry) -> None:
        self.meter = meter
        self.spend = spend
        self.ratelimit = ratelimit
        self.telemetry = telemetry

    async def open(self, call: Call) -> None:
        """The write-ahead usage record (ledger/wal.py), fsync'd before the call runs, so a
        crash from here on still bills it; 503 when usage cannot be recorded."""
        await self.meter.admit(self._record(call, completion_tokens=0, status=call.status,
                                            finish_reason=None, latency_ms=0.0))

    def progress(self, call: Call) -> None:
        """Completion tokens handed to the client so far (what a kill -9 bills)."""
        self.meter.progress(call.request_id, call.completion_tokens)

    def finish(self, call: Call) -> None:
        """Meter, settle the rate limit, record metrics and close the trace. Once."""
        if call.finished:
            return
        call.finished = True
        if not call.dispatched:
            call.prompt_tokens = 0  # refused before any backend saw it: nothing to bill
        latency_s = time.perf_counter() - call.started
        reasons = sorted({c.finish_reason for c in call.choices if c.finish_reason})
        record = self._record(
            call, completion_tokens=call.completion_tokens, status=call.status,
            finish_reason=",".join(reasons) or None, latency_ms=latency_s * 1000)
        record.cost_pico = call.cost_pico = self.spend.price(call, record.created_at)
        record.backend = call.served_by or (call.pool.name if call.dispatched else None)
        self.meter.record(record)
        self.ratelimit.settle(call)
        self.spend.finish(call)
        self.telemetry.observe_request(
            model=call.model, endpoint=call.endpoint, status=call.status, latency_s=latency_s,
            ttft_s=call.ttft_s, prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens, provider=call.provider,
        )
        if self.telemetry.tracing:
            self._trace(call, reasons)

    def _record(self, call: Call, *, completion_tokens: int, status: int,
                finish_reason: str | None, latency_ms: float) -> UsageRecord:
        return UsageRecord(
            request_id=call.request_id,
            tenant_id=call.principal.tenant_id,
            key_id=call.principal.key_id,
            model=call.model,
            endpoint=call.endpoint,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=completion_tokens,
            status=status,
            finish_reason=finish_reason,
            latency_ms=latency_ms,
            ttft_ms=call.ttft_s * 1000 if call.ttft_s is not None else None,
            created_at=dt.datetime.now(dt.UTC),
        )

    def _trace(self, call: Call, reasons: list[str]) -> None:
        """Spans for the backend's phases, from the timestamps the call collected."""
        tracer = self.telemetry.tracer
        parent = trace.set_span_in_context(call.span)
        for c in call.choices:
            phases = [("queue", c.queued_at, c.dispatched_at),
                      ("prefill", c.dispatched_at, c.first_token_at),
                      ("decode", c.first_token_at, c.done_at)]
            for name, start, end in phases:
                if start is not None and end is not None:
                    tracer.start_span(name, context=parent, start_time=start).end(end_time=end)
        with tracer.start_as_current_span("metering", context=parent):
            pass
        call.span.set_attributes(gen_ai_attributes(
            model=call.model, input_tokens=call.prompt_tokens,
            output_tokens=call.completion_tokens, finish_reasons=reasons or None))
        call.span.set_attribute("http.response.status_code", call.status)
        call.span.end()
