"""Model groups: one model served by several backends, with balancing, retries, ordered
fallbacks and health-based ejection; and model aliases.

The router only plans: for a model it returns the routes to try, in order. The pipeline
walks that plan and moves to the next route only while nothing has reached the client
(a stream that has sent its first byte is never replayed elsewhere). A backend that fails
``eject_after`` times in a row is left out of plans for ``eject_for_s`` (doubling while it
keeps failing, up to ``max_eject_s``) and comes back after that, or as a last resort when
every backend of a group is ejected.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sluice.gateway.backends.contract import BackendError

if TYPE_CHECKING:  # the registry imports settings, which imports these config types
    from sluice.gateway.backends.registry import ModelRegistry, Route


class GroupMember(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str
    weight: float = Field(1.0, gt=0)


class GroupConfig(BaseModel):
    """``[groups.<model>]``: the backends that serve ``<model>`` and how to use them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backends: tuple[GroupMember, ...] = ()
    strategy: Literal["weighted", "least_busy", "ordered"] = "weighted"
    retries: int = Field(2, ge=0, le=10)  # further attempts after the first
    backoff_s: float = Field(0.2, ge=0)
    max_retry_after_s: float = Field(5.0, ge=0)  # an upstream's Retry-After above this: next
    fallbacks: tuple[str, ...] = ()  # other models to try, in order, once this one's fail
    eject_after: int = Field(3, ge=1)
    eject_for_s: float = Field(10.0, gt=0)
    max_eject_s: float = Field(300.0, gt=0)


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)


@dataclass(slots=True)
class _Health:
    failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0


@dataclass(frozen=True, slots=True)
class Attempt:
    route: Route
    model: str  # the model this route serves (differs from the asked one after a fallback)


@dataclass(slots=True)
class Plan:
    """The routes to try for one request, and the policy between them."""

    attempts: list[Attempt]
    group: GroupConfig | None
    router: Router
    tried: int = 0
    log: list[str] = field(default_factory=list)

    def delay_before_next(self, exc: BaseException) -> float | None:
        """Seconds to wait before the next attempt after ``exc``, or None to stop here."""
        self.tried += 1
        if self.group is None or self.tried >= len(self.attempts):
            return None
        if not isinstance(exc, BackendError) or not exc.retryable:
            return None
        if self.tried > self.group.retries + len(self.group.fallbacks):
            return None
        retry_after = _retry_after(exc)
        if retry_after is not None:
            if retry_after > self.group.max_retry_after_s:
                return 0.0  # do not wait that long here: try the next backend now
            return float(retry_after)
        return self.group.backoff_s * (2 ** (self.tried - 1))


def _retry_after(exc: BackendError) -> float | None:
    """An upstream's ``Retry-After`` in seconds (the HTTP-date form is not waited for)."""
    for name, value in exc.headers.items():
        if name.lower() == "retry-after":
            try:
                return max(float(value), 0.0)
            except ValueError:
                return None
    return None


class Router:
    def __init__(self, registry: ModelRegistry, config: RoutingConfig, *,
                 pools: Mapping[str, Any] | None = None,
                 busy: Callable[[str], int] | None = None,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.config = config
        self.pools = pools or {}  # backend name -> its runtime pool (what dispatch leases)
        self._busy = busy or (lambda backend: 0)
        self._rng = rng or random.Random()
        self._clock = clock
        self._health: dict[str, _Health] = {}

    def resolve(self, model: str) -> str:
        return self.config.aliases.get(model, model)

    def plan(self, model: str) -> Plan | None:
        """The attempts for ``model`` (an alias is resolved); None for an unknown model."""
        name = self.resolve(model)
        routes = self.registry.routes(name)
        if not routes:
            return None
        group = self.config.groups.get(name)
        attempts = [Attempt(r, name) for r in self._order(routes, group)]
        for other in group.fallbacks if group else ():
            attempts += [Attempt(r, other) for r in self._order(
                self.registry.routes(other), self.config.groups.get(other))]
        return Plan(attempts=attempts, group=group, router=self)

    def _order(self, routes: list[Route], group: GroupConfig | None) -> list[Route]:
        if len(routes) <= 1 or group is None:
            return list(routes)
        now = self._clock()
        healthy = [r for r in routes if self._state(r.backend_name).ejected_until <= now]
        ejected = sorted((r for r in routes if r not in healthy),
                         key=lambda r: self._state(r.backend_name).ejected_until)
        weights = {m.backend: m.weight for m in group.backends}
        if group.strategy == "least_busy":
            healthy.sort(key=lambda r: (self._busy(r.backend_name), -weights.get(r.backend_name, 1)))
        elif group.strategy == "weighted":
            # Weighted sampling without replacement (Efraimidis-Spirakis keys).
            healthy.sort(key=lambda r: -self._rng.random() ** (1 / weights.get(r.backend_name, 1.0)))
        return healthy + ejected

    def _state(self, backend: str) -> _Health:
        return self._health.setdefault(backend, _Health())

    def succeeded(self, backend: str) -> None:
        state = self._state(backend)
        state.failures = state.ejections = 0
        state.ejected_until = 0.0

    def failed(self, backend: str, group: GroupConfig | None) -> None:
        if group is None:
            return
        state = self._state(backend)
        state.failures += 1
        if state.failures >= group.eject_after:
            span = min(group.eject_for_s * 2 ** state.ejections, group.max_eject_s)
            state.ejected_until = self._clock() + span
            state.ejections += 1
            state.failures = 0

    def ejected(self) -> dict[str, float]:
        """Backends out of rotation now, with the seconds until they return."""
        now = self._clock()
        return {name: s.ejected_until - now for name, s in self._health.items()
                if s.ejected_until > now}


def check_routing(config: RoutingConfig, registry: ModelRegistry) -> None:
    """Fail at start-up, in one line, on a group or alias that names nothing served."""
    from sluice.gateway.errors import SettingsError

    for model, group in config.groups.items():
        served = {r.backend_name for r in registry.routes(model)}
        if not served:
            raise SettingsError(f"groups.{model}: no configured backend serves '{model}'")
        for member in group.backends:
            if member.backend not in served:
                raise SettingsError(f"groups.{model}: backend '{member.backend}' does not "
                                    f"serve '{model}' (served by: {', '.join(sorted(served))})")
        for other in group.fallbacks:
            if not registry.routes(other):
                raise SettingsError(f"groups.{model}.fallbacks: no backend serves '{other}'")
    for alias, target in config.aliases.items():
        if not registry.routes(target):
            raise SettingsError(f"aliases.{alias}: no backend serves '{target}'")
        if registry.routes(alias):
            raise SettingsError(f"aliases.{alias}: a backend already serves a model of that name")
