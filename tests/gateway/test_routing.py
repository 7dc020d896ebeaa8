"""The router's plans: balancing, fallbacks, retry policy and health-based ejection."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sluice.gateway.backends.contract import BackendError
from sluice.gateway.backends.registry import ModelRegistry
from sluice.gateway.backends.routing import GroupConfig, GroupMember, Router, RoutingConfig
from sluice.gateway.settings import BackendConfig, SettingsError
from sluice.plugins.echo import EchoBackend


def echo(model: str) -> EchoBackend:
    return EchoBackend(EchoBackend.Options(model=model))


def registry(grouped: set[str], backends: dict[str, str]) -> ModelRegistry:
    reg = ModelRegistry(frozenset(grouped))
    for name, model in backends.items():
        reg.add(name, echo(model))
    return reg


def test_a_model_on_two_backends_needs_a_group() -> None:
    with pytest.raises(SettingsError, match="groups"):
        registry(set(), {"a": "m", "b": "m"})
    assert [r.backend_name for r in registry({"m"}, {"a": "m", "b": "m"}).routes("m")] == ["a", "b"]
    assert BackendConfig(plugin="echo")  # the config type the registry is built from


def test_weighted_balancing_follows_the_weights() -> None:
    group = GroupConfig(backends=(GroupMember(backend="a", weight=3), GroupMember(backend="b")))
    router = Router(registry({"m"}, {"a": "m", "b": "m"}), RoutingConfig(groups={"m": group}),
                    rng=random.Random(1))
    first = Counter(router.plan("m").attempts[0].route.backend_name for _ in range(4000))
    assert 0.70 < first["a"] / 4000 < 0.80  # 3:1


def test_least_busy_prefers_the_idler_backend() -> None:
    busy = {"a": 5, "b": 1}
    group = GroupConfig(strategy="least_busy")
    router = Router(registry({"m"}, {"a": "m", "b": "m"}), RoutingConfig(groups={"m": group}),
                    busy=busy.__getitem__)
    assert [a.route.backend_name for a in router.plan("m").attempts] == ["b", "a"]


def test_aliases_and_ordered_fallbacks_to_another_model() -> None:
    group = GroupConfig(strategy="ordered", fallbacks=("small",))
    router = Router(registry({"big"}, {"a": "big", "b": "big", "c": "small"}),
                    RoutingConfig(groups={"big": group}, aliases={"gpt-4o": "big"}))
    plan = router.plan("gpt-4o")
    assert [(a.route.backend_name, a.model) for a in plan.attempts] == [
        ("a", "big"), ("b", "big"), ("c", "small")]
    assert router.plan("unknown") is None


def test_retry_policy_respects_retryable_and_retry_after() -> None:
    group = GroupConfig(strategy="ordered", retries=2, backoff_s=0.1, max_retry_after_s=2)
    router = Router(registry({"m"}, {"a": "m", "b": "m", "c": "m"}),
                    RoutingConfig(groups={"m": group}))
    plan = router.plan("m")
    assert plan.delay_before_next(BackendError("bad request", status=400)) is None
    plan = router.plan("m")
    assert plan.delay_before_next(BackendError("down", retryable=True)) == pytest.approx(0.1)
    limited = BackendError("slow down", status=429, retryable=True, headers={"Retry-After": "1.5"})
    assert plan.delay_before_next(limited) == pytest.approx(1.5)
    assert plan.delay_before_next(BackendError("down", retryable=True)) is None  # all 3 tried


def test_a_failing_backend_is_ejected_then_recovers() -> None:
    now = [0.0]
    group = GroupConfig(strategy="ordered", eject_after=2, eject_for_s=10)
    router = Router(registry({"m"}, {"a": "m", "b": "m"}), RoutingConfig(groups={"m": group}),
                    clock=lambda: now[0])
    router.failed("a", group)
    assert router.plan("m").attempts[0].route.backend_name == "a"
    router.failed("a", group)
    assert [a.route.backend_name for a in router.plan("m").attempts] == ["b", "a"]  # last resort
    assert router.ejected() == {"a": 10}
    now[0] = 10.5
    assert router.plan("m").attempts[0].route.backend_name == "a"
    router.failed("a", group)
    router.failed("a", group)
    assert router.ejected()["a"] == pytest.approx(20)  # ejected again: twice as long
    router.succeeded("a")
    assert router.ejected() == {}
