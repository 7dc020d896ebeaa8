"""The checks around dispatch, one small class each.

    Authenticator   API key -> Principal; auth failures audited (rate-limited)
    RateLimitStage  entropy-weighted rate limits, reserved before and settled after
    Guardrails      LlamaGuard on the prompt and on the answer (streams: rolling windows)

They are built in the lifespan (sluice/gateway/state.py) and run in order by
:class:`~sluice.gateway.pipeline.service.Pipeline`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sluice.gateway.ledger.audit import AuditLog, prompt_digest
from sluice.gateway.accounts.auth import KeyStore, Principal
from sluice.gateway.backends.contract import GenerationRequest, SamplingParams
from sluice.gateway.errors import (
    AuthenticationFailed,
    ContentPolicyViolation,
    PermissionDenied,
    RateLimitExceeded,
    ServiceUnavailable,
)
from sluice.gateway.pipeline.guard import Guard, GuardPolicy, StreamGuard, StreamGuardConfig, Verdict
from sluice.gateway.pipeline.call import Call
from sluice.gateway.pipeline.ratelimit import LimiterError, Limits, RateLimited, RateLimiter
from sluice.gateway.backends.runtime import Pool
from sluice.gateway.telemetry import Telemetry

log = logging.getLogger("sluice.stages")

AUTH_AUDIT_INTERVAL_S = 60.0


class Authenticator:
    """Resolves the caller; records a key's first use and (at most once a minute per
    client and reason) authentication failures in the audit log."""

    def __init__(self, keys: KeyStore, audit: AuditLog) -> None:
        self.keys = keys
        self.audit = audit
        self._seen: set[str] = set()
        self._failures: dict[tuple[str, str], tuple[float, int]] = {}

    async def authenticate(self, authorization: str | None, client: str,
                           request_id: str) -> Principal:
        try:
            principal = await self.keys.authenticate(authorization)
        except (AuthenticationFailed, PermissionDenied) as exc:
            await self._failure(client, exc.instance_code or exc.code or "denied", request_id,
                                authorization)
            raise
        if principal.never_used and principal.key_id not in self._seen:
            self._seen.add(principal.key_id)
            await self.audit.record(
                principal.tenant_name, "key.first_use", principal.key_id,
                request_id=request_id, decision="allow", details={"client": client},
            )
        return principal

    async def _failure(self, client: str, reason: str, request_id: str,
                       authorization: str | None) -> None:
        now = time.monotonic()
        last, suppressed = self._failures.get((client, reason), (0.0, 0))
        if now - last < AUTH_AUDIT_INTERVAL_S:
            self._failures[(client, reason)] = (last, suppressed + 1)
            return
        self._failures[(client, reason)] = (now, 0)
        if len(self._failures) > 10_000:  # bounded memory under a flood of clients
            self._failures.clear()
        token = (authorization or "").partition(" ")[2].strip()
        await self.audit.record(
            client, "auth.failure", token[:15] if token.startswith("sk-") else "-",
            request_id=request_id, decision="deny",
            details={"reason": reason, "suppressed_since_last": suppressed},
        )


class RateLimitStage:
    """Rate limits per key and per tenant, weighted by the prompt's entropy: reserved at
    admission, settled with the tokens really spent when the call ends."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        # Settling runs in the background: it must not hold up, or be cancelled with, the
        # response. ``close`` waits for what is still running.
        self._settling: set[asyncio.Task[None]] = set()

    async def admit(self, call: Call) -> None:
        p = call.principal
        if p.key_rpm is None and p.key_tpm is None and p.tenant_rpm is None and p.tenant_tpm is None:
            return  # unlimited: nothing to count against
        try:
            call.admission = await self.limiter.admit(
                key_id=p.key_id, tenant_id=p.tenant_id,
                key_limits=Limits(p.key_rpm, p.key_tpm),
                tenant_limits=Limits(p.tenant_rpm, p.tenant_tpm),
                prompt=call.conversation,
                prompt_tokens=call.estimated_prompt_tokens(),  # nothing tokenized
                max_tokens=call.reserve_tokens * len(call.requests),
            )
        except RateLimited as exc:
            raise RateLimitExceeded(exc.message, headers=exc.headers) from None
        except LimiterError as exc:  # the shared store is down and the limiter fails closed
            raise ServiceUnavailable(exc.message, retry_after_s=exc.retry_after_s,
                                     headers=exc.headers) from None
        call.headers.update(call.admission.headers)

    def settle(self, call: Call) -> None:
        if call.admission is not None:
            spent = call.prompt_tokens + call.completion_tokens
            task = asyncio.ensure_future(self.limiter.settle(call.admission, spent))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def close(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)


Complete = Callable[[str], Awaitable[str]]


def pool_completer(pool: Pool, model: str, max_tokens: int = 24) -> Complete:
    """The guard model's `complete(prompt) -> text`, through a runtime pool."""

    async def complete(prompt: str) -> str:
        request = GenerationRequest(
            f"guard_{secrets.token_hex(8)}", model,
            SamplingParams(max_tokens=max_tokens, temperature=0.0), prompt=prompt,
        )
        async with pool.lease() as worker:
            return "".join([event.text async for event in worker.backend.generate(request)])

    return complete


class Guardrails:
    """LlamaGuard on prompts and answers, per tenant policy. ``guard`` None: off."""

    def __init__(self, guard: Guard | None, audit: AuditLog, limiter: RateLimiter,
                 telemetry: Telemetry, stream_config: StreamGuardConfig | None = None) -> None:
        self.guard = guard
        self.audit = audit
        self.limiter = limiter
        self.telemetry = telemetry
        self.stream_config = stream_config or StreamGuardConfig()
        self._policies: dict[str, tuple[Any, GuardPolicy]] = {}

    @property
    def enabled(self) -> bool:
        return self.guard is not None

    def policy(self, principal: Principal) -> GuardPolicy:
        raw = principal.guard_policy
        cached = self._policies.get(principal.tenant_id)
        if cached is None or cached[0] != raw:
            cached = (raw, GuardPolicy.model_validate(raw or {}))
            self._policies[principal.tenant_id] = cached
        return cached[1]

    async def check_input(self, call: Call) -> None:
        if self.guard is None:
            return
        verdict = await self.guard.check_input(call.conversation, self.policy(call.principal))
        await self._enforce(call, "input", verdict)

    async def check_output(self, call: Call, answer: str) -> None:
        if self.guard is None:
            return
        verdict = await self.guard.check_output(call.conversation, answer,
                                                self.policy(call.principal))
        await self._enforce(call, "output", verdict)

    def stream(self, call: Call) -> StreamGuard | None:
        if self.guard is None:
            return None
        return self.guard.stream(call.conversation, self.policy(call.principal),
                                 self.stream_config)

    async def _enforce(self, call: Call, stage: str, verdict: Verdict) -> None:
        self.telemetry.observe_guard(stage, verdict.latency_s)
        if verdict.decision == "allow":
            return
        await self._record(call, stage, verdict)
        if verdict.decision == "block":
            raise violation(stage, verdict)

    async def enforce_stream_block(self, call: Call, verdict: Verdict) -> None:
        """A streamed answer was cut: record it like any other block."""
        self.telemetry.observe_guard("output", verdict.latency_s)
        await self._record(call, "output", verdict)

    async def _record(self, call: Call, stage: str, verdict: Verdict) -> None:
        await self.audit.record(
            call.principal.tenant_name, f"guard.{stage}", call.principal.key_id,
            request_id=call.request_id, decision=verdict.decision,
            details={"categories": list(verdict.categories), "error": verdict.error,
                     "error_detail": verdict.detail, "guard_calls": verdict.windows,
                     "unmoderated_bytes": verdict.skipped_bytes,
                     "model": call.model,
                     **prompt_digest(call.prompt_text, call.principal.store_prompts)},
        )
        if verdict.decision == "block":
            await self.limiter.record_violation(call.principal.key_id, call.principal.tenant_id)


def violation(stage: str, verdict: Verdict) -> ContentPolicyViolation:
    what = "prompt" if stage == "input" else "answer"
    why = ", ".join(verdict.categories) if verdict.categories else f"guard error: {verdict.error}"
    return ContentPolicyViolation(
        f"The {what} was blocked by the content policy ({why}).",
        extra={"categories": list(verdict.categories)},
    )
