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

Stores: `MemoryStore` (one process) and `RedisStore` (shared by all replicas; one Lua
script, one round trip per admit, times taken from the Redis server's clock).

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
from typing import Any, Literal, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from sluice.gateway.pipeline.entropy import EntropyConfig, score_prompt

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None  # requests per minute (per window); None = unlimited
    tpm: int | None = None  # tokens per minute (per window); None = unlimited


class RiskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    half_life_s: float = Field(default=900.0, gt=0)
    weight: float = Field(default=0.5, ge=0)  # multiplier = 1 + weight * risk
    max_multiplier: float = Field(default=4.0, ge=1)
    clean_credit: float = Field(default=0.02, ge=0)  # risk removed per clean admitted request
    obfuscation_risk: float = Field(default=0.1, ge=0)  # risk added per unit of entropy score


class RateLimitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    window_s: float = Field(default=60.0, gt=0)  # rpm/tpm are "per window"; 60 s as OpenAI
    entropy: EntropyConfig = EntropyConfig()
    risk: RiskConfig = RiskConfig()
    key_prefix: str = "sluice:rl"
    on_store_error: Literal["open", "closed"] = "open"
    store_timeout_s: float = Field(default=0.1, gt=0)
    store_retry_s: float = Field(default=1.0, ge=0)  # after an error, skip the store this long
    error_log_interval_s: float = Field(default=60.0, ge=0)
    unavailable_retry_after_s: float = Field(default=1.0, gt=0)


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


# ---------------------------------------------------------------- stores

@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    limit: int  # units per window; 0 = unlimited (skipped)


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    buckets: tuple[Bucket, Bucket, Bucket, Bucket]  # key req, key tok, tenant req, tenant tok
    risk_key: str
    base_tokens: int
    entropy_multiplier: float
    entropy_score: float


@dataclass(frozen=True, slots=True)
class AdmitResult:
    allowed: bool
    too_large: bool  # the cost exceeds a bucket's whole capacity
    cost: int
    multiplier: float
    risk_multiplier: float
    retry_after_s: float
    remaining: tuple[int, int, int, int]
    reset_s: tuple[float, float, float, float]


class LimiterStore(Protocol):
    async def admit(self, req: AdmitRequest) -> AdmitResult: ...
    async def adjust(self, buckets: list[Bucket], delta: int) -> None: ...
    async def add_risk(self, risk_key: str, amount: float) -> None: ...
    async def close(self) -> None: ...


def _cost(base: int, multiplier: float) -> int:
    return math.ceil(base * multiplier - 1e-9)


class MemoryStore:
    """Single-process store; the same arithmetic as the Redis script."""

    def __init__(self, config: RateLimitConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = config
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._risk: dict[str, tuple[float, float]] = {}
        self._ops = 0

    def _risk_now(self, key: str, now: float) -> float:
        value, at = self._risk.get(key, (0.0, now))
        return value * 0.5 ** ((now - at) / self._cfg.risk.half_life_s)

    async def admit(self, req: AdmitRequest) -> AdmitResult:
        now, window, risk_cfg = self._clock(), self._cfg.window_s, self._cfg.risk
        self._sweep(now)
        risk = self._risk_now(req.risk_key, now)
        risk_mult = min(risk_cfg.max_multiplier, 1.0 + risk_cfg.weight * risk)
        mult = req.entropy_multiplier * risk_mult
        cost = _cost(req.base_tokens, mult)
        allowed, too_large, retry = True, False, 0.0
        new_tats: list[float | None] = []
        for i, b in enumerate(req.buckets):
            if b.limit <= 0:
                new_tats.append(None)
                continue
            t = window / b.limit
            units = 1 if i % 2 == 0 else cost
            new_tat = max(self._tat.get(b.key, now), now) + units * t
            if units * t > window + 1e-9:
                too_large = True
            if new_tat - now > window + 1e-9:
                allowed = False
                retry = max(retry, new_tat - now - window)
            new_tats.append(new_tat)
        remaining, reset = [], []
        for b, new_tat in zip(req.buckets, new_tats):
            if new_tat is None:
                remaining.append(-1)
                reset.append(0.0)
                continue
            tat = new_tat if allowed else max(self._tat.get(b.key, now), now)
            t = window / b.limit
            if allowed:
                self._tat[b.key] = new_tat
            remaining.append(max(0, math.floor((window - (tat - now)) / t + 1e-9)))
            reset.append(max(0.0, tat - now))
        if allowed:
            if req.entropy_score > 0:
                risk += risk_cfg.obfuscation_risk * req.entropy_score
            else:
                risk = max(0.0, risk - risk_cfg.clean_credit)
            self._risk[req.risk_key] = (risk, now)
        return AdmitResult(allowed, too_large, cost, mult, risk_mult, retry,
                           tuple(remaining), tuple(reset))  # type: ignore[arg-type]

    async def adjust(self, buckets: list[Bucket], delta: int) -> None:
        now = self._clock()
        for b in buckets:
            if b.limit <= 0:
                continue
            t = self._cfg.window_s / b.limit
            tat = max(self._tat.get(b.key, now), now)
            self._tat[b.key] = max(now, tat + delta * t)

    async def add_risk(self, risk_key: str, amount: float) -> None:
        now = self._clock()
        self._risk[risk_key] = (self._risk_now(risk_key, now) + amount, now)

    def _sweep(self, now: float) -> None:
        """Forget full buckets and negligible risk so memory stays bounded."""
        self._ops += 1
        if self._ops % 4096:
            return
        self._tat = {k: v for k, v in self._tat.items() if v > now}
        self._risk = {k: v for k, v in self._risk.items() if self._risk_now(k, now) > 1e-3}

    async def close(self) -> None:
        return None


_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local base = tonumber(ARGV[6])
local emult = tonumber(ARGV[7])
local escore = tonumber(ARGV[8])
local half_life, weight, max_mult = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local clean_credit, obf_risk = tonumber(ARGV[12]), tonumber(ARGV[13])
local risk = 0
local r = redis.call('HMGET', KEYS[5], 'r', 't')
if r[1] then
  risk = tonumber(r[1]) * math.pow(0.5, (now - tonumber(r[2])) / half_life)
end
local risk_mult = math.min(max_mult, 1 + weight * risk)
local mult = emult * risk_mult
local cost = math.ceil(base * mult - 1e-9)
local allowed, too_large, retry = 1, 0, 0
local tats, new_tats = {}, {}
for i = 1, 4 do
  local limit = tonumber(ARGV[1 + i])
  if limit > 0 then
    local tv = window / limit
    local units = cost
    if i % 2 == 1 then units = 1 end
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if tat < now then tat = now end
    tats[i] = tat
    new_tats[i] = tat + units * tv
    if units * tv > window + 1e-9 then too_large = 1 end
    if new_tats[i] - now > window + 1e-9 then
      allowed = 0
      retry = math.max(retry, new_tats[i] - now - window)
    end
  end
end
local out = {tostring(allowed), tostring(too_large), tostring(cost), string.format('%.6f', mult),
             string.format('%.6f', risk_mult), string.format('%.6f', retry)}
for i = 1, 4 do
  local limit = tonumber(ARGV[1 + i])
  if limit > 0 then
    local tv = window / limit
    local tat = tats[i]
    if allowed == 1 then
      tat = new_tats[i]
      redis.call('SET', KEYS[i], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
    end
    out[#out + 1] = tostring(math.max(0, math.floor((window - (tat - now)) / tv + 1e-9)))
    out[#out + 1] = string.format('%.6f', tat - now)
  else
    out[#out + 1] = '-1'
    out[#out + 1] = '0'
  end
end
if allowed == 1 then
  if escore > 0 then risk = risk + obf_risk * escore else risk = math.max(0, risk - clean_credit) end
  if risk > 0.001 then
    redis.call('HSET', KEYS[5], 'r', string.format('%.6f', risk), 't', string.format('%.6f', now))
    redis.call('PEXPIRE', KEYS[5], math.ceil(half_life * 12000))
  else
    redis.call('DEL', KEYS[5])
  end
end
return out
"""

_ADJUST_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, #KEYS do
  local tv = window / tonumber(ARGV[2 + i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  tat = math.max(now, tat + delta * tv)
  if tat > now then
    redis.call('SET', KEYS[i], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
  else
    redis.call('DEL', KEYS[i])
  end
end
return 1
"""

_RISK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local half_life = tonumber(ARGV[2])
local risk = 0
local r = redis.call('HMGET', KEYS[1], 'r', 't')
if r[1] then
  risk = tonumber(r[1]) * math.pow(0.5, (now - tonumber(r[2])) / half_life)
end
risk = risk + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'r', string.format('%.6f', risk), 't', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(half_life * 12000))
return string.format('%.6f', risk)
"""


class RedisStore:
    """Shared store: every admit is one EVALSHA; times come from the Redis server."""

    def __init__(self, client: aioredis.Redis | RedisCluster, config: RateLimitConfig) -> None:
        self._r = client
        self._cfg = config
        self._admit = client.register_script(_ADMIT_LUA)
        self._adjust = client.register_script(_ADJUST_LUA)
        self._risk = client.register_script(_RISK_LUA)

    @classmethod
    def from_url(cls, url: str, config: RateLimitConfig, *, cluster: bool = False) -> RedisStore:
        """``cluster``: ``url`` names one node of a Redis Cluster; the client discovers the
        rest and sends each script call to the node owning its keys' slot."""
        options: dict[str, Any] = {"socket_timeout": config.store_timeout_s,
                                   "socket_connect_timeout": config.store_timeout_s,
                                   "retry": Retry(NoBackoff(), 0)}
        client = (RedisCluster.from_url(url, **options) if cluster
                  else aioredis.Redis.from_url(url, **options))
        return cls(client, config)

    async def admit(self, req: AdmitRequest) -> AdmitResult:
        risk = self._cfg.risk
        out = await self._admit(
            keys=[b.key for b in req.buckets] + [req.risk_key],
            args=[self._cfg.window_s, *(b.limit for b in req.buckets), req.base_tokens,
                  req.entropy_multiplier, req.entropy_score, risk.half_life_s, risk.weight,
                  risk.max_multiplier, risk.clean_credit, risk.obfuscation_risk])
        v = [x.decode() if isinstance(x, bytes) else str(x) for x in out]
        return AdmitResult(
            allowed=v[0] == "1", too_large=v[1] == "1", cost=int(v[2]), multiplier=float(v[3]),
            risk_multiplier=float(v[4]), retry_after_s=float(v[5]),
            remaining=tuple(int(v[6 + 2 * i]) for i in range(4)),  # type: ignore[arg-type]
            reset_s=tuple(float(v[7 + 2 * i]) for i in range(4)))  # type: ignore[arg-type]

    async def adjust(self, buckets: list[Bucket], delta: int) -> None:
        live = [b for b in buckets if b.limit > 0]
        if live and delta:
            await self._adjust(keys=[b.key for b in live],
                               args=[self._cfg.window_s, delta, *(b.limit for b in live)])

    async def add_risk(self, risk_key: str, amount: float) -> None:
        await self._risk(keys=[risk_key], args=[amount, self._cfg.risk.half_life_s])

    async def close(self) -> None:
        await self._r.aclose()


# ---------------------------------------------------------------- limiter

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
