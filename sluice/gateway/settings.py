"""One typed Settings object, read from ``SLUICE_*`` environment variables and the TOML
file named by ``SLUICE_CONFIG`` (backends, rate limits, prices, groups, aliases, cache).

Nothing else reads the environment: :meth:`Settings.from_env` takes it as a mapping. The
two sources meet only at the in-process engine: ``SLUICE_MODEL``/``SLUICE_DTYPE`` fill in
the ``model``/``dtype`` options of the file's backends of plugin "local", and a file that
sets a different value is an error. A bad value or an unknown key fails fast with one clear
line (:class:`SettingsError`), never a traceback.
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

from sluice.gateway.backends.config import BackendConfig, PoolConfig
from sluice.gateway.backends.routing import GroupConfig
from sluice.gateway.economics.config import PriceConfig
from sluice.gateway.pipeline.cache import CacheConfig
from sluice.gateway.errors import SettingsError
from sluice.gateway.pipeline.ratelimit import RateLimitConfig

__all__ = ["BackendConfig", "FileConfig", "PoolConfig", "Settings", "SettingsError",
           "default_backends", "load_file_config"]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./sluice.db"


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


ENGINE_PLUGIN = "local"  # the in-process engine, which SLUICE_MODEL and SLUICE_DTYPE configure


def default_backends(model: str | None = None, dtype: str | None = None,
                     ) -> dict[str, BackendConfig]:
    """With no config file: the echo backend and the in-process engine."""
    return {
        "echo": BackendConfig(plugin="echo"),
        "local": BackendConfig(plugin=ENGINE_PLUGIN, options=_engine_options({}, model, dtype)),
    }


def _engine_options(options: dict[str, Any], model: str | None,
                    dtype: str | None) -> dict[str, Any]:
    """``options`` with ``model`` and ``dtype`` filled in; a different value already there
    is a conflict between the environment and the config file."""
    merged = dict(options)
    for name, value in (("model", model), ("dtype", dtype)):
        if value is None:
            continue
        if merged.get(name, value) != value:
            raise SettingsError(
                f"SLUICE_{name.upper()}={value} conflicts with {name} = "
                f"{merged[name]!r} in the config file; set it in one place")
        merged[name] = value
    return merged


def _with_engine_settings(backends: dict[str, Any], model: str | None,
                          dtype: str | None) -> dict[str, BackendConfig]:
    """Configured backends with SLUICE_MODEL / SLUICE_DTYPE applied to the engine's."""
    configs = {name: BackendConfig.model_validate(c) for name, c in backends.items()}
    engines = [name for name, c in configs.items() if c.plugin == ENGINE_PLUGIN]
    if not engines:
        which = "SLUICE_MODEL" if model is not None else "SLUICE_DTYPE"
        raise SettingsError(f"{which} is set but no backend uses plugin "
                            f"'{ENGINE_PLUGIN}' (the in-process engine) to apply it to")
    for name in engines:
        config = configs[name]
        configs[name] = config.model_copy(
            update={"options": _engine_options(config.options, model, dtype)})
    return configs


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
    # idle_timeout_s: longer than clients keep idle connections (httpx and the openai SDK:
    # 5 s; load balancers: 60 s), as nginx's 75 s, so that the gateway never closes one a
    # client is reusing at that moment. X-Forwarded-For/-Proto are honoured only from trusted_proxies
    # (comma-separated addresses or CIDRs; "" trusts nobody, "*" everybody).
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)
    body_idle_s: float = Field(15.0, gt=0)
    idle_timeout_s: int = Field(75, ge=1)
    trusted_proxies: str = ""
    # Requests of one tenant in flight at once (0: no bound); beyond it, 429.
    tenant_max_concurrency: int = Field(64, ge=0)
    meter_batch_size: int = Field(500, ge=1)
    meter_flush_interval_s: float = Field(0.2, gt=0)
    plugins: tuple[str, ...] | None = None  # None: every installed plugin may load
    # The in-process engine's checkpoint and dtype (SLUICE_MODEL, SLUICE_DTYPE). They fill
    # in ``model``/``dtype`` of the backends of plugin "local" (the default backends when
    # none are configured); a config file that sets another value is an error.
    model: str | None = None
    dtype: str | None = None
    backends: dict[str, BackendConfig]  # default: default_backends(model, dtype)
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
    # `sluice billing push-stripe`: the Stripe key (STRIPE_API_KEY, Stripe's own name), its
    # API base (SLUICE_STRIPE_API_BASE, e.g. a test server) and the Billing Meter event names.
    stripe_api_key: str = Field("", repr=False)
    stripe_api_base: str | None = None
    stripe_input_meter: str = "sluice_input_tokens"
    stripe_output_meter: str = "sluice_output_tokens"
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
    def _derived_defaults(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        if values.get("spool_dir") is None:
            values["data_dir"] = Path(values.get("data_dir") or default_data_dir())
            values["spool_dir"] = values["data_dir"] / "spool"
        model, dtype = values.get("model"), values.get("dtype")
        if values.get("backends") is None:
            values["backends"] = default_backends(model, dtype)
        elif model is not None or dtype is not None:
            values["backends"] = _with_engine_settings(values["backends"], model, dtype)
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
            "STRIPE_API_KEY": "stripe_api_key",
            "SLUICE_STRIPE_API_BASE": "stripe_api_base",
            "SLUICE_STRIPE_INPUT_METER": "stripe_input_meter",
            "SLUICE_STRIPE_OUTPUT_METER": "stripe_output_meter",
            "SLUICE_DASHBOARD_COOKIE_SECURE": "dashboard_cookie_secure",
            "SLUICE_HEADER_TIMEOUT_S": "header_timeout_s",
            "SLUICE_BODY_TIMEOUT_S": "body_timeout_s",
            "SLUICE_BODY_IDLE_S": "body_idle_s",
            "SLUICE_IDLE_TIMEOUT_S": "idle_timeout_s",
            "SLUICE_TRUSTED_PROXIES": "trusted_proxies",
            "SLUICE_TENANT_MAX_CONCURRENCY": "tenant_max_concurrency",
            "SLUICE_MODEL": "model",
            "SLUICE_DTYPE": "dtype",
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
