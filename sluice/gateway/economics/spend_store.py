"""Where budget spend is counted: in Redis, shared by every replica (each reservation and
settlement one Lua script, atomic), or in process memory for a single gateway.

Counters are whole micro-units per budget and period: ``s`` spent, ``r`` reserved.
"""

from __future__ import annotations

import time
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster


class SpendStore(Protocol):
    async def seed(self, key: str, spent: int, ttl_s: float) -> None: ...
    async def reserve(self, keys: list[str], limits: list[int | None], amount: int,
                      ttl_s: float) -> tuple[int, list[int]]: ...
    async def settle(self, keys: list[str], reserved: int, actual: int) -> list[tuple[int, int]]: ...
    async def claim_alert(self, key: str, ttl_s: float) -> bool: ...
    async def spent(self, key: str) -> int | None: ...
    async def close(self) -> None: ...


class MemorySpendStore:
    """One process: every method runs without awaiting, so each is atomic on the loop."""

    def __init__(self) -> None:
        self._spent: dict[str, list[int]] = {}  # key -> [spent, reserved]
        self._expiry: dict[str, float] = {}
        self._alerts: dict[str, float] = {}

    def _live(self, key: str) -> list[int] | None:
        if self._expiry.get(key, 0) < time.monotonic():
            self._spent.pop(key, None)
            return None
        return self._spent.get(key)

    async def seed(self, key: str, spent: int, ttl_s: float) -> None:
        if self._live(key) is None:
            self._spent[key] = [spent, 0]
            self._expiry[key] = time.monotonic() + ttl_s

    async def reserve(self, keys: list[str], limits: list[int | None], amount: int,
                      ttl_s: float) -> tuple[int, list[int]]:
        rows = [self._live(k) or [0, 0] for k in keys]
        for i, (row, limit) in enumerate(zip(rows, limits, strict=True)):
            if limit is not None and row[0] + row[1] + amount > limit:
                return i + 1, [r[0] for r in rows]
        for key, row in zip(keys, rows, strict=True):
            row[1] += amount
            self._spent[key] = row
            self._expiry.setdefault(key, time.monotonic() + ttl_s)
        return 0, [r[0] for r in rows]

    async def settle(self, keys: list[str], reserved: int, actual: int) -> list[tuple[int, int]]:
        out = []
        for key in keys:
            row = self._live(key) or [0, reserved]
            before = row[0]
            row[0] += actual
            row[1] = max(row[1] - reserved, 0)
            self._spent[key] = row
            out.append((before, row[0]))
        return out

    async def claim_alert(self, key: str, ttl_s: float) -> bool:
        if self._alerts.get(key, 0) >= time.monotonic():
            return False
        self._alerts[key] = time.monotonic() + ttl_s
        return True

    async def spent(self, key: str) -> int | None:
        row = self._live(key)
        return None if row is None else row[0]

    async def close(self) -> None:
        return None


# KEYS: budget hashes. ARGV: amount, ttl_ms, then one limit per key (-1: soft, no limit).
# Returns {index of the refusing budget (0: none), spent of each key...}.
_RESERVE = """
local amount = tonumber(ARGV[1])
local spent = {}
for i, key in ipairs(KEYS) do
  local s = tonumber(redis.call('HGET', key, 's') or '0')
  local r = tonumber(redis.call('HGET', key, 'r') or '0')
  spent[i] = s
  local limit = tonumber(ARGV[2 + i])
  if limit >= 0 and s + r + amount > limit then
    return {i, unpack(spent)}
  end
end
for i, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'r', amount)
  if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ARGV[2]) end
end
return {0, unpack(spent)}
"""

# KEYS: budget hashes. ARGV: reserved, actual. Returns spent before and after, per key.
_SETTLE = """
local out = {}
for i, key in ipairs(KEYS) do
  local before = tonumber(redis.call('HGET', key, 's') or '0')
  local r = redis.call('HINCRBY', key, 'r', -tonumber(ARGV[1]))
  if r < 0 then redis.call('HSET', key, 'r', 0) end
  local after = redis.call('HINCRBY', key, 's', tonumber(ARGV[2]))
  out[2 * i - 1] = before
  out[2 * i] = after
end
return out
"""


class RedisSpendStore:
    """Across replicas: each reservation and settlement is one Lua script, atomic in Redis.
    Every key of a request carries the tenant's hash tag, so a Redis Cluster keeps them in
    one slot."""

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self._redis = client
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)

    async def seed(self, key: str, spent: int, ttl_s: float) -> None:
        if await self._redis.hsetnx(key, "s", spent):
            await self._redis.pexpire(key, int(ttl_s * 1000))

    async def reserve(self, keys: list[str], limits: list[int | None], amount: int,
                      ttl_s: float) -> tuple[int, list[int]]:
        argv = [amount, int(ttl_s * 1000), *(-1 if lim is None else lim for lim in limits)]
        result = await self._reserve(keys=keys, args=argv)
        return int(result[0]), [int(v) for v in result[1:]]

    async def settle(self, keys: list[str], reserved: int, actual: int) -> list[tuple[int, int]]:
        flat = await self._settle(keys=keys, args=[reserved, actual])
        return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def claim_alert(self, key: str, ttl_s: float) -> bool:
        return bool(await self._redis.set(key, "1", nx=True, px=int(ttl_s * 1000)))

    async def spent(self, key: str) -> int | None:
        value = await self._redis.hget(key, "s")
        return None if value is None else int(value)

    async def close(self) -> None:
        await self._redis.aclose()
