"""Rate-limit stores: the GCRA buckets and the risk score, in memory or in Redis.

`MemoryStore` serves one process; `RedisStore` is shared by all replicas (one Lua
script, one round trip per admit, times taken from the Redis server's clock). Both
do the same arithmetic; see gateway/pipeline/ratelimit.py for the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from sluice.gateway.pipeline.ratelimit_config import RateLimitConfig


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
