"""How a backend is configured: its plugin, the plugin's options and its pool's scaling.

A leaf module (pydantic only), so that the runtime and the registry read their config
without importing the Settings that compose it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PoolConfig(BaseModel):
    """How the runtime scales one backend (see sluice/gateway/backends/runtime.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_workers: int = Field(0, ge=0)
    max_workers: int = Field(1, ge=1)
    max_concurrency: int = Field(64, ge=1)
    idle_timeout_s: float = Field(300.0, gt=0)
    # What an idle worker does after idle_timeout_s: stop (release everything) or sleep
    # (backends that support it park their weights and free the accelerator; waking is fast).
    idle_action: Literal["stop", "sleep"] = "stop"
    # A sleeping worker is stopped after this much more idleness (None: it sleeps on).
    stop_after_sleep_s: float | None = Field(None, gt=0)
    queue_size: int = Field(256, ge=0)
    queue_timeout_s: float = Field(30.0, gt=0)
    start_timeout_s: float = Field(600.0, gt=0)
    # Data parallel: one worker per device at most, each started, balanced and scaled to
    # zero on its own; the backend's factory gets the device (its `device` option). None:
    # every worker on the backend's own device.
    devices: tuple[str, ...] | None = Field(None, min_length=1)


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    plugin: str
    options: dict[str, Any] = Field(default_factory=dict)
    pool: PoolConfig = Field(default_factory=PoolConfig)
