"""An exact-match response cache for deterministic requests.

A request is deterministic when it asks for ``temperature: 0`` or a fixed ``seed``; only those
are cached (a sampled request never is). The key is a SHA-256 of the tenant, endpoint, model
and the request body without its transport fields (``stream``, ``stream_options``), so a
streamed and a plain request share an entry, and tenants never share one unless the operator
says so. What is cached is the backend's event stream per choice, not a rendered response:
a hit replays those events through the same formatting as a live answer, so it is streamed or
not as asked and carries exactly the live answer's fields.

Entries live in Redis (shared by replicas) when ``SLUICE_REDIS_URL`` is set, else in an
in-process LRU bounded by entries and bytes. A client opts out per request with
``Cache-Control: no-cache`` (or ``no-store``), an operator per tenant in the config.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from redis.exceptions import RedisError

from sluice.gateway.backends.contract import GenerationEvent

TRANSPORT_FIELDS = frozenset({"stream", "stream_options"})
_EVENTS = TypeAdapter(list[list[GenerationEvent]])


class CacheConfig(BaseModel):
    """``[cache]`` in the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    ttl_s: float = Field(300.0, gt=0)
    max_entries: int = Field(10_000, ge=1)  # in-process store only
    max_bytes: int = Field(64 << 20, ge=1)  # in-process store only
    max_entry_bytes: int = Field(1 << 20, ge=1)
    # A hit is billed at zero, or its prompt and completion at the model's cached-input price.
    hit_price: Literal["zero", "cached_input"] = "zero"
    shared_across_tenants: bool = False
    disabled_tenants: tuple[str, ...] = ()  # tenant ids or names
    key_prefix: str = "sluice:cache:"


def deterministic(body: Mapping[str, Any]) -> bool:
    return body.get("temperature") == 0 or body.get("seed") is not None


def opted_out(headers: Mapping[str, str]) -> bool:
    value = headers.get("cache-control", "").lower()
    return "no-cache" in value or "no-store" in value


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def close(self) -> None: ...


class MemoryCacheStore:
    """LRU with expiry, bounded by entry count and total bytes."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[1]

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if key in self._items:
            self._drop(key)
        self._items[key] = (time.monotonic() + ttl_s, value)
        self._bytes += len(value)
        while self._items and (len(self._items) > self._max_entries
                               or self._bytes > self._max_bytes):
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        _, value = self._items.pop(key)
        self._bytes -= len(value)

    async def close(self) -> None:
        self._items.clear()
        self._bytes = 0


class RedisCacheStore:
    """Shared by replicas; bounded by the entry TTL and Redis's own memory policy. A Redis
    error is a miss (the cache never fails a request)."""

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self._redis = client

    async def get(self, key: str) -> bytes | None:
        try:
            return await self._redis.get(key)
        except RedisError:
            return None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self._redis.set(key, value, px=int(ttl_s * 1000))
        except RedisError:
            pass

    async def close(self) -> None:
        await self._redis.aclose()


class ResponseCache:
    def __init__(self, config: CacheConfig, store: CacheStore) -> None:
        self.config = config
        self.store = store
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_settings(cls, config: CacheConfig, redis_url: str | None, *,
                      cluster: bool = False) -> ResponseCache:
        if not redis_url or not config.enabled:
            return cls(config, MemoryCacheStore(config.max_entries, config.max_bytes))
        client = RedisCluster.from_url(redis_url) if cluster else aioredis.Redis.from_url(redis_url)
        return cls(config, RedisCacheStore(client))

    def key_for(self, *, tenant_id: str, tenant_name: str, endpoint: str, model: str,
                body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
        """The entry's key, or None when this request must not use the cache."""
        if (not self.config.enabled or not deterministic(body) or opted_out(headers)
                or tenant_id in self.config.disabled_tenants
                or tenant_name in self.config.disabled_tenants):
            return None
        scope = "*" if self.config.shared_across_tenants else tenant_id
        semantic = {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS}
        digest = hashlib.sha256(orjson.dumps(
            [scope, endpoint, model, semantic], option=orjson.OPT_SORT_KEYS)).hexdigest()
        return f"{self.config.key_prefix}{digest}"

    async def get(self, key: str) -> list[list[GenerationEvent]] | None:
        raw = await self.store.get(key)
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return _EVENTS.validate_json(raw)

    async def put(self, key: str, choices: list[list[GenerationEvent]]) -> bool:
        """Store a complete answer (every choice finished); False when it is too large."""
        raw = _EVENTS.dump_json(choices)
        if len(raw) > self.config.max_entry_bytes:
            return False
        await self.store.set(key, raw, self.config.ttl_s)
        return True

    async def close(self) -> None:
        await self.store.close()
