"""One typed Settings object, read from ``SLUICE_*`` environment variables.

A bad value fails fast with one clear line (:class:`SettingsError`), never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sluice.gateway.backends.routing import GroupConfig
from sluice.gateway.economics.config import PriceConfig
from sluice.gateway.pipeline.cache import CacheConfig
from sluice.gateway.pipeline.ratelimit import RateLimitConfig

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./sluice.db"


class SettingsError(Exception):
    """Configuration is invalid; the message is one line meant for the operator."""


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


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    plugin: str
    options: dict[str, Any] = Field(default_factory=dict)
    pool: PoolConfig = Field(default_factory=PoolConfig)


class FileConfig(BaseModel):
    """The TOML file named by ``SLUICE_CONFIG``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backends: dict[str, BackendConfig] = Field(default_factory=dict)
    ratelimit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    # Money and routing (docs/operations.md): prices per model, model groups served by
    # several backends, aliases, and the response cache.
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)
    cache: CacheConfig = Field(default_factory=CacheConfig)


def default_backends() -> dict[str, BackendConfig]:
    """With no config file: the echo backend and the in-process engine."""
    local_options: dict[str, Any] = {}
    if model := os.environ.get("SLUICE_MODEL"):
        local_options["model"] = model
    if dtype := os.environ.get("SLUICE_DTYPE"):
        local_options["dtype"] = dtype
    return {
        "echo": BackendConfig(plugin="echo"),
        "local": BackendConfig(plugin="local", options=local_options),
    }


def default_data_dir() -> Path:
    """``$XDG_STATE_HOME/sluice`` with XDG's default for ``XDG_STATE_HOME``."""
    return Path.home() / ".local" / "state" / "sluice"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    redis_cluster: bool = False  # redis_url names one node of a Redis Cluster
    config_path: Path | None = None
    admin_jwt_secret: str = ""
    admin_jwt_ttl_s: int = Field(3600, gt=0)
    key_cache_ttl_s: float = Field(5.0, ge=0)
    max_body_bytes: int = Field(1 << 20, gt=0)
    max_n: int = Field(8, ge=1)
    # Connection bounds (edge, issue 18): a request's headers must arrive within
    # header_timeout_s of its first byte, its body within body_timeout_s (and no gap
    # between body chunks over body_idle_s); an idle keep-alive connection is closed after
    # idle_timeout_s. X-Forwarded-For/-Proto are honoured only from trusted_proxies
    # (comma-separated addresses or CIDRs; "" trusts nobody, "*" everybody).
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)
    body_idle_s: float = Field(15.0, gt=0)
    idle_timeout_s: int = Field(5, ge=1)
    trusted_proxies: str = ""
    # Requests of one tenant in flight at once (0: no bound); beyond it, 429.
    tenant_max_concurrency: int = Field(64, ge=0)
    meter_batch_size: int = Field(500, ge=1)
    meter_flush_interval_s: float = Field(0.2, gt=0)
    plugins: tuple[str, ...] | None = None  # None: every installed plugin may load
    backends: dict[str, BackendConfig] = Field(default_factory=default_backends)
    ratelimit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    # Tokens reserved against tokens/min limits when a request sets no max_tokens.
    default_reserve_tokens: int = Field(1024, ge=1)
    # The guard model: a model name served by a configured backend, or a checkpoint
    # directory run on the in-process engine. None: guardrails off.
    guard_model: str | None = None
    # The gateway's own files (generated JWT secret, spools, WAL, audit key), never
    # relative to the working directory: SLUICE_DATA_DIR, else $XDG_STATE_HOME/sluice.
    data_dir: Path = Field(default_factory=default_data_dir)
    spool_dir: Path  # default: <data_dir>/spool
    # With the database unreachable: keep serving and spool usage to disk, or refuse (503).
    db_outage: Literal["serve", "refuse"] = "serve"
    otlp_endpoint: str | None = None
    service_name: str = "sluice"
    instance_id: str | None = None  # the audit chain's name; default host-pid
    # The audit chain's HMAC key (never stored in the database); unset: a 0600 file,
    # audit_key_file or <data_dir>/audit_key, created on first use.
    audit_key: str = Field("", repr=False)
    audit_key_file: Path | None = None
    # Signed audit chain heads, outside the database; unset: <data_dir>/audit.checkpoints
    audit_checkpoints: Path | None = None
    # The dashboard cookie's Secure flag; None: set it when the request came over HTTPS.
    dashboard_cookie_secure: bool | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("admin_jwt_secret")
    @classmethod
    def _jwt_secret_long_enough(cls, value: str) -> str:
        # "" is unset (from_env fills it in); a short one is guessable offline from any
        # token (HS256), so refuse it (edge, issue 18).
        if value and len(value.encode()) < 32:
            raise ValueError(f"must be at least 32 bytes, got {len(value.encode())}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _spool_in_data_dir(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("spool_dir") is None:
            data_dir = Path(values.get("data_dir") or default_data_dir())
            values = {**values, "data_dir": data_dir, "spool_dir": data_dir / "spool"}
        return values

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        simple = {
            "SLUICE_DATABASE_URL": "database_url",
            "SLUICE_REDIS_URL": "redis_url",
            "SLUICE_REDIS_CLUSTER": "redis_cluster",
            "SLUICE_ADMIN_JWT_SECRET": "admin_jwt_secret",
            "SLUICE_ADMIN_JWT_TTL_S": "admin_jwt_ttl_s",
            "SLUICE_KEY_CACHE_TTL_S": "key_cache_ttl_s",
            "SLUICE_MAX_BODY_BYTES": "max_body_bytes",
            "SLUICE_LOG_LEVEL": "log_level",
            "SLUICE_GUARD_MODEL": "guard_model",
            "SLUICE_DATA_DIR": "data_dir",
            "SLUICE_SPOOL_DIR": "spool_dir",
            "SLUICE_DB_OUTAGE": "db_outage",
            "SLUICE_OTLP_ENDPOINT": "otlp_endpoint",
            "SLUICE_INSTANCE_ID": "instance_id",
            "SLUICE_AUDIT_KEY": "audit_key",
            "SLUICE_AUDIT_KEY_FILE": "audit_key_file",
            "SLUICE_AUDIT_CHECKPOINTS": "audit_checkpoints",
            "SLUICE_DASHBOARD_COOKIE_SECURE": "dashboard_cookie_secure",
            "SLUICE_HEADER_TIMEOUT_S": "header_timeout_s",
            "SLUICE_BODY_TIMEOUT_S": "body_timeout_s",
            "SLUICE_BODY_IDLE_S": "body_idle_s",
            "SLUICE_IDLE_TIMEOUT_S": "idle_timeout_s",
            "SLUICE_TRUSTED_PROXIES": "trusted_proxies",
            "SLUICE_TENANT_MAX_CONCURRENCY": "tenant_max_concurrency",
        }
        for var, name in simple.items():
            if env.get(var):
                values[name] = env[var]
        if "data_dir" not in values and env.get("XDG_STATE_HOME"):
            values["data_dir"] = Path(env["XDG_STATE_HOME"]) / "sluice"
        if env.get("SLUICE_PLUGINS"):
            values["plugins"] = tuple(p.strip() for p in env["SLUICE_PLUGINS"].split(",") if p)
        if path := env.get("SLUICE_CONFIG"):
            values["config_path"] = Path(path)
            file_config = load_file_config(Path(path))
            values["backends"] = file_config.backends
            values["ratelimit"] = file_config.ratelimit
            for name in ("prices", "groups", "aliases", "cache"):
                values[name] = getattr(file_config, name)
        values.update(overrides)
        if not values.get("admin_jwt_secret"):
            data_dir = Path(values.get("data_dir") or default_data_dir())
            values["admin_jwt_secret"] = _persistent_secret(data_dir)
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise SettingsError(f"invalid setting {where}: {err['msg']}") from None


def load_file_config(path: Path) -> FileConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"SLUICE_CONFIG: no such file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"SLUICE_CONFIG: {path} is not valid TOML: {exc}") from None
    try:
        return FileConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SettingsError(f"SLUICE_CONFIG {path}: {where}: {err['msg']}") from None


def _persistent_secret(data_dir: Path) -> str:
    """A JWT secret kept in the data directory, so tokens survive restarts.

    Real deployments set SLUICE_ADMIN_JWT_SECRET; this is for `make run`.
    """
    path = data_dir / "jwt_secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written to a file created 0600 in one step (never readable by others, not even
        # briefly), then linked into place: a process racing us reads a whole secret.
        tmp = path.with_name(f".jwt_secret.{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process won: use its secret
                os.link(tmp, path)
        finally:
            tmp.unlink()
        return path.read_text().strip()
