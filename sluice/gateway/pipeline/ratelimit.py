"""Rate limiting: request and token buckets per API key and per tenant.

A request is admitted only if all four buckets (key requests, key tokens, tenant
requests, tenant tokens) have room; then all four are charged together. The token
cost is `(prompt_tokens + max_tokens) * multiplier`, where the multiplier is the
prompt's entropy multiplier (gateway/entropy.py) times the key's adaptive risk
multiplier (guard violations raise it, it halves every `risk.half_life_s`, clean
traffic earns it back). `settle()` returns what the answer did not use.

Buckets are GCRA ("generic cell rate algorithm"): one number per bucket, the
theoretical arrival time (TAT). A bucket of `limit` per `window_s` refills one unit
every `window_s / limit` seconds and holds at most `limit` units.

Stores (pipeline/ratelimit_store.py): `MemoryStore` (one process) and `RedisStore`
(shared by all replicas; one Lua script, one round trip per admit, times taken from the
Redis server's clock). Configuration: pipeline/ratelimit_config.py.

Errors (all carry `retry_after_s`, `headers` and `message`):

    LimiterError
    ├── RateLimited         429: over a limit (or a request larger than the limit)
    └── LimiterUnavailable  503: the store is unreachable and on_store_error="closed"
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from redis.exceptions import RedisError

from sluice.gateway.pipeline.entropy import score_prompt
from sluice.gateway.pipeline.ratelimit_config import Limits, RateLimitConfig, RiskConfig
from sluice.gateway.pipeline.ratelimit_store import (
    AdmitRequest,
    AdmitResult,
    Bucket,
    LimiterStore,
    MemoryStore,
    RedisStore,
    _cost,
)

__all__ = ["Admission", "LimiterError", "LimiterUnavailable", "Limits", "MemoryStore",
           "RateLimitConfig", "RateLimited", "RateLimiter", "RedisStore", "RiskConfig",
           "format_duration"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class LimiterError(Exception):
    status_code = 500

    def __init__(self, retry_after_s: float, headers: dict[str, str], message: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.headers = headers
        self.message = message


class RateLimited(LimiterError):
    status_code = 429


class LimiterUnavailable(LimiterError):
    status_code = 503


@dataclass(slots=True)
class Admission:
    key_id: str
    tenant_id: str
    key_limits: Limits
    tenant_limits: Limits
    multiplier: float  # entropy multiplier * risk multiplier
    entropy_score: float
    entropy_reason: str
    risk_multiplier: float
    reserved_tokens: int
    headers: dict[str, str]
    degraded: bool = False  # admitted without the store (on_store_error="open")
    settled: bool = field(default=False, compare=False)


def format_duration(seconds: float) -> str:
    """OpenAI/Go style duration: 20ms, 1s, 1.5s, 6m0s, 1h2m3s."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    s = f"{round(secs, 3):.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{s}"
    if minutes >= 1:
        return f"{int(minutes)}m{s}"
    return s


_STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class RateLimiter:
    """Entropy-weighted request and token limits per key and per tenant."""

    def __init__(self, store: LimiterStore, config: RateLimitConfig = RateLimitConfig()) -> None:
        self._store = store
        self._cfg = config
        self._down_until = 0.0
        self._last_log = -math.inf
        self._suppressed = 0

    @classmethod
    def from_settings(cls, redis_url: str | None, config: RateLimitConfig, *,
                      redis_cluster: bool = False) -> RateLimiter:
        store = (RedisStore.from_url(redis_url, config, cluster=redis_cluster) if redis_url
                 else MemoryStore(config))
        return cls(store, config)

    @property
    def config(self) -> RateLimitConfig:
        return self._cfg

    def _buckets(self, key_id: str, tenant_id: str, key: Limits, tenant: Limits) -> tuple[
            Bucket, Bucket, Bucket, Bucket]:
        # The tenant as hash tag keeps the four buckets and the risk key in one Redis Cluster
        # slot, so each admit stays one script call on one node.
        k = f"{self._cfg.key_prefix}:{{{tenant_id}}}:key:{key_id}"
        t = f"{self._cfg.key_prefix}:{{{tenant_id}}}:tenant"
        return (Bucket(f"{k}:req", key.rpm or 0), Bucket(f"{k}:tok", key.tpm or 0),
                Bucket(f"{t}:req", tenant.rpm or 0), Bucket(f"{t}:tok", tenant.tpm or 0))

    def _risk_key(self, key_id: str, tenant_id: str) -> str:
        return f"{self._cfg.key_prefix}:{{{tenant_id}}}:risk:{key_id}"

    async def admit(self, *, key_id: str, tenant_id: str, key_limits: Limits,
                    tenant_limits: Limits, prompt: str | Sequence[tuple[str, str]],
                    prompt_tokens: int, max_tokens: int) -> Admission:
        """Reserve 1 request and the request's weighted tokens, or raise RateLimited.
        `prompt`: the text, or every (role, text) turn the model will read (all of it is
        priced: entropy.score_prompt)."""
        size = len(prompt) if isinstance(prompt, str) else sum(len(t) for _, t in prompt)
        if size > self._cfg.entropy.inline_max_chars:
            # A long prompt is priced on a worker thread (the loop's default executor, the
            # gateway's bounded CPU pool): numpy releases the GIL for most of the work.
            entropy = await asyncio.to_thread(score_prompt, prompt, self._cfg.entropy)
        else:
            entropy = score_prompt(prompt, self._cfg.entropy)
        base = max(0, prompt_tokens) + max(0, max_tokens)
        buckets = self._buckets(key_id, tenant_id, key_limits, tenant_limits)
        req = AdmitRequest(buckets, self._risk_key(key_id, tenant_id), base, entropy.multiplier,
                           entropy.score)
        result = await self._call_store(self._store.admit, req)
        if result is None:  # store down, failing open
            return Admission(key_id, tenant_id, key_limits, tenant_limits, entropy.multiplier,
                             entropy.score, entropy.reason, 1.0,
                             _cost(base, entropy.multiplier), {}, degraded=True)
        headers = _headers(buckets, result, self._cfg.window_s)
        if not result.allowed:
            retry = self._cfg.window_s if result.too_large else result.retry_after_s
            headers["retry-after"] = str(max(1, math.ceil(retry)))
            headers["retry-after-ms"] = str(max(1, math.ceil(retry * 1000)))
            raise RateLimited(retry, headers, _denial_message(buckets, result, key_limits,
                                                               tenant_limits, entropy.reason))
        return Admission(key_id, tenant_id, key_limits, tenant_limits, result.multiplier,
                         entropy.score, entropy.reason, result.risk_multiplier, result.cost,
                         headers)

    async def settle(self, admission: Admission, actual_tokens: int) -> None:
        """Give back the reserved tokens the request did not use (or charge any excess)."""
        if admission.settled or admission.degraded:
            return
        admission.settled = True
        delta = _cost(max(0, actual_tokens), admission.multiplier) - admission.reserved_tokens
        if delta == 0:
            return
        b = self._buckets(admission.key_id, admission.tenant_id, admission.key_limits,
                          admission.tenant_limits)
        await self._call_store(self._store.adjust, [b[1], b[3]], delta, raise_closed=False)

    async def record_violation(self, key_id: str, tenant_id: str, severity: float = 1.0) -> None:
        """Raise a key's risk (e.g. a guard block); it decays with risk.half_life_s."""
        await self._call_store(self._store.add_risk, self._risk_key(key_id, tenant_id), max(0.0, severity),
                               raise_closed=False)

    async def close(self) -> None:
        await self._store.close()

    async def _call_store(self, fn: Callable[..., Awaitable[T]], *args: object,
                          raise_closed: bool = True) -> T | None:
        """Run a store call; on a store error log (rate-limited) and fail open or closed."""
        if not isinstance(self._store, RedisStore):
            return await fn(*args)  # in-process: nothing can be unreachable
        if time.monotonic() >= self._down_until:
            try:
                return await asyncio.wait_for(fn(*args), self._cfg.store_timeout_s * 3)
            except _STORE_ERRORS as exc:
                self._down_until = time.monotonic() + self._cfg.store_retry_s
                self._log_store_error(exc)
        if raise_closed and self._cfg.on_store_error == "closed":
            retry = self._cfg.unavailable_retry_after_s
            raise LimiterUnavailable(retry, {"retry-after": str(max(1, math.ceil(retry)))},
                                     "rate limiter unavailable; try again shortly")
        return None

    def _log_store_error(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_log < self._cfg.error_log_interval_s:
            self._suppressed += 1
            return
        log.warning("rate-limit store unreachable (%s: %s); failing %s; %d similar errors "
                    "suppressed", type(exc).__name__, exc, self._cfg.on_store_error,
                    self._suppressed)
        self._last_log, self._suppressed = now, 0


def _headers(buckets: tuple[Bucket, ...], result: AdmitResult, window: float) -> dict[str, str]:
    """x-ratelimit-* for the tighter of key/tenant, requests and tokens separately."""
    headers: dict[str, str] = {}
    for kind, (a, b) in (("requests", (0, 2)), ("tokens", (1, 3))):
        live = [i for i in (a, b) if buckets[i].limit > 0]
        if not live:
            continue
        i = min(live, key=lambda j: (result.remaining[j] / buckets[j].limit, -result.reset_s[j]))
        headers[f"x-ratelimit-limit-{kind}"] = str(buckets[i].limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(result.remaining[i])
        headers[f"x-ratelimit-reset-{kind}"] = format_duration(result.reset_s[i])
    return headers


def _denial_message(buckets: tuple[Bucket, ...], result: AdmitResult, key: Limits,
                    tenant: Limits, reason: str) -> str:
    weighted = f" (cost x{result.multiplier:.2g}{': ' + reason if reason else ''})" \
        if result.multiplier > 1 else ""
    if result.too_large:
        limits = [x for x in (key.tpm, tenant.tpm) if x]
        return (f"Request too large: needs {result.cost} tokens{weighted}, more than the limit "
                f"of {min(limits)} tokens per minute.")
    names = ["requests per minute (key)", "tokens per minute (key)",
             "requests per minute (tenant)", "tokens per minute (tenant)"]
    needs = (1, result.cost, 1, result.cost)
    hit = [f"{b.limit} {name}"
           for b, name, rem, need in zip(buckets, names, result.remaining, needs)
           if b.limit > 0 and rem < need]
    return (f"Rate limit reached: {', '.join(hit) or 'limit'}; this request needs "
            f"{result.cost} tokens{weighted}. Retry after {result.retry_after_s:.1f}s.")
