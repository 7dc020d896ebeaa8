"""Shared fixtures: a database of the run's own on the real Postgres, and a real uvicorn
server running the gateway in a background thread."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn

POSTGRES_URL = os.environ.get(
    "SLUICE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SLUICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("SLUICE_TEST_REQUIRE_SERVICES") == "1"


@pytest.fixture(autouse=True)
def _data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's gateway files (spools, WAL, generated secrets) in a temporary directory
    of its own, for servers in this process (echo_settings) and in subprocesses alike."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.setenv("SLUICE_DATA_DIR", str(state / "sluice"))
    return state / "sluice"


def _reachable(url: str, default_port: int) -> bool:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    try:
        with socket.create_connection((u.host or "127.0.0.1", u.port or default_port), 2):
            return True
    except OSError:
        return False


def _service_missing(name: str, url: str) -> None:
    message = f"{name} is not reachable at {url}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (SLUICE_TEST_REQUIRE_SERVICES=1: these tests may not skip)")
    pytest.skip(message)


async def _admin_execute(url: str, *statements: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database=u.database
    )
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def make_postgres_database(prefix: str = "sluice_t") -> str:
    """A fresh, migrated database of this run's own; drop it with drop_postgres_database."""
    from sqlalchemy.engine import make_url

    from sluice.gateway.db.session import migrate

    if not _reachable(POSTGRES_URL, 5432):
        _service_missing("Postgres", POSTGRES_URL)
    name = f"{prefix}_{secrets.token_hex(6)}"
    asyncio.run(_admin_execute(POSTGRES_URL, f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    migrate(url)
    return url


def drop_postgres_database(url: str) -> None:
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    asyncio.run(_admin_execute(POSTGRES_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = make_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture(scope="module")
def own_db() -> Iterator[str]:
    """A migrated Postgres database of the test module's own, for modules whose rows must
    not show in other modules' counts on the session's shared database."""
    url = make_postgres_database("sluice_mod")
    yield url
    drop_postgres_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from sluice.gateway.db.session import migrate

    url = f"sqlite+aiosqlite:///{tmp_path / 'sluice.db'}"
    migrate(url)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _reachable(REDIS_URL, 6379):
        _service_missing("Redis", REDIS_URL)
    return REDIS_URL


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 >= 65536:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A three-node Redis Cluster (redis-server --cluster-enabled) on free ports, started
    for the session and torn down after; the URL names its first node."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        pytest.fail("redis-server and redis-cli are needed to start a test cluster", pytrace=False)
    data = tmp_path_factory.mktemp("redis-cluster")
    ports: list[int] = []
    procs = []
    try:
        for _ in range(3):
            port = _cluster_port()
            ports.append(port)
            procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf", "--save", "", "--appendonly", "no",
                 "--dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            _wait(lambda p=port: redis.Redis(host="127.0.0.1", port=p, socket_timeout=0.5).ping())
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for port in ports:
            _wait(lambda p=port: _cluster_ok(p))
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def _cluster_ok(port: int) -> bool:
    info = redis.Redis(host="127.0.0.1", port=port, decode_responses=True).execute_command("CLUSTER INFO")
    return (info.get("cluster_state") if isinstance(info, dict) else "cluster_state:ok" in info) in (True, "ok")


def _wait(ready, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the test Redis Cluster did not come up")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayServer:
    """The real app under a real uvicorn, on a free port, in a thread of its own."""

    def __init__(self, settings: Any, *, telemetry: Any = None) -> None:
        from sluice.gateway.app import create_app

        self.settings = settings
        self.app = create_app(settings, telemetry=telemetry)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def start(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def gateway(self) -> Any:
        """The running gateway's AppState (sluice/gateway/state.py)."""
        return self.app.state.sluice

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop (e.g. to create tenants and keys)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def tenant_key(self, tenant: str | None = None, **key_options: Any) -> str:
        """A new tenant (unless it exists) and a new key of it; returns the secret."""
        accounts = self.gateway.accounts
        tenant = tenant or f"t-{secrets.token_hex(4)}"

        async def make() -> str:
            try:
                await accounts.tenant(tenant)
            except Exception:
                await accounts.create_tenant(tenant)
            return (await accounts.create_key(tenant, **key_options)).secret

        return str(self.run(make()))


# One audit key for the whole run, as every replica of a deployment shares one: gateways of
# different tests append to the same chains on the session's Postgres database.
AUDIT_KEY = "test-audit-key-" + secrets.token_hex(16)


def echo_settings(database_url: str, **overrides: Any) -> Any:
    from sluice.gateway.settings import BackendConfig, Settings

    overrides.setdefault("audit_key", AUDIT_KEY)

    backends = overrides.pop(
        "backends",
        {
            "echo": BackendConfig(plugin="echo"),
            "slow-echo": BackendConfig(
                plugin="echo", options={"model": "slow-echo", "tokens_per_s": 5}
            ),
        },
    )
    # The test's own data directory (see _data_dir; module-scoped servers get a new one).
    overrides.setdefault("data_dir", Path(os.environ.get("SLUICE_DATA_DIR")
                                          or tempfile.mkdtemp(prefix="sluice-data-")))
    return Settings(
        database_url=database_url,
        admin_jwt_secret="test-secret-" + secrets.token_hex(16),
        backends=backends,
        meter_flush_interval_s=0.05,
        **overrides,
    )


@pytest.fixture
def sqlite_server(sqlite_url: str) -> Iterator[GatewayServer]:
    server = GatewayServer(echo_settings(sqlite_url)).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_server(postgres_url: str) -> Iterator[GatewayServer]:
    server = GatewayServer(echo_settings(postgres_url)).start()
    yield server
    server.stop()


ECHO_CONFIG = """
[backends.echo]
plugin = "echo"

[backends.slow-echo]
plugin = "echo"
[backends.slow-echo.options]
model = "slow-echo"
tokens_per_s = 1
"""


class ProcessServer:
    """``sluice serve`` as its own OS process, as an operator runs it."""

    def __init__(self, database_url: str, tmp: Path, config: str = ECHO_CONFIG,
                 env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys

        self.database_url = database_url
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        (tmp / "sluice.toml").write_text(config)
        env = {
            **os.environ,
            "SLUICE_DATABASE_URL": database_url,
            "SLUICE_CONFIG": str(tmp / "sluice.toml"),
            "SLUICE_ADMIN_JWT_SECRET": "test-secret-" + secrets.token_hex(16),
            "SLUICE_AUDIT_KEY": AUDIT_KEY,
            "SLUICE_LOG_LEVEL": "warning",
            "SLUICE_SPOOL_DIR": str(tmp / "spool"),
            **(env or {}),
        }
        self.log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sluice.gateway.cli", "serve", "--port", str(self.port)],
            env=env, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> ProcessServer:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sluice serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("sluice serve did not become ready")

    def stop(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
        self.log.close()

    async def tenant_key(self, tenant: str, **options: Any) -> str:
        from sluice.gateway.accounts.tenants import Accounts
        from sluice.gateway.db.session import create_engine, sessionmaker

        engine = create_engine(self.database_url)
        accounts = Accounts(sessionmaker(engine))
        try:
            try:
                await accounts.tenant(tenant)
            except Exception:
                await accounts.create_tenant(tenant)
            return (await accounts.create_key(tenant, **options)).secret
        finally:
            await engine.dispose()
