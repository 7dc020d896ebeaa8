"""Keys persisted on local disk: a gateway that starts while the database is down still
knows the keys it had seen (SLUICE_DB_OUTAGE=serve), and nothing else."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sluice.gateway.accounts.auth import KeyStore
from sluice.gateway.accounts.tenants import Accounts
from sluice.gateway.db.session import create_engine, migrate, sessionmaker
from sluice.gateway.errors import AuthenticationFailed, ServiceUnavailable
from sluice.gateway.ledger.key_cache import KeyCacheFile


async def test_a_restart_during_an_outage_serves_persisted_keys(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = create_engine(url)
    accounts = Accounts(sessionmaker(engine))
    await accounts.create_tenant("acme", rpm=60)
    seen = (await accounts.create_key("acme", models=["echo"])).secret
    unseen = (await accounts.create_key("acme")).secret
    revoked = await accounts.create_key("acme")
    cache = KeyCacheFile(tmp_path / "keys.cache")
    up = KeyStore(sessionmaker(engine), persisted=cache)
    principal = await up.authenticate(f"Bearer {seen}")
    await up.authenticate(f"Bearer {revoked.secret}")
    await accounts.revoke_key(revoked.key.id)
    up.invalidate()
    with pytest.raises(AuthenticationFailed, match="revoked"):  # the revocation is persisted too
        await up.authenticate(f"Bearer {revoked.secret}")
    for _ in range(3):  # an unknown prefix, many times: never written
        with pytest.raises(AuthenticationFailed):
            await up.authenticate("Bearer sk-" + "Z" * 52)
    cache.close()
    await engine.dispose()

    # The "restart": a new process-worth of state, the database unreachable.
    down = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    restarted = KeyStore(sessionmaker(down), persisted=KeyCacheFile(tmp_path / "keys.cache"))
    again = await restarted.authenticate(f"Bearer {seen}")
    assert again == principal and again.models == frozenset({"echo"})
    with pytest.raises(AuthenticationFailed):  # right prefix, wrong secret
        await restarted.authenticate(f"Bearer {seen[:-4]}XXXX")
    with pytest.raises(AuthenticationFailed, match="revoked"):
        await restarted.authenticate(f"Bearer {revoked.secret}")
    with pytest.raises(ServiceUnavailable):  # never seen: cannot be checked, 503 not 500
        await restarted.authenticate(f"Bearer {unseen}")
    await down.dispose()
    rows = sqlite3.connect(tmp_path / "keys.cache").execute("SELECT count(*) FROM keys")
    assert rows.fetchone()[0] == 2
    assert (tmp_path / "keys.cache").stat().st_mode & 0o777 == 0o600


async def test_persisted_entries_expire(tmp_path: Path) -> None:
    cache = KeyCacheFile(tmp_path / "keys.cache", max_age_s=0.0)
    cache.save("abc", {"x": 1})
    assert cache.load("abc") is None
    assert KeyCacheFile(tmp_path / "k2", max_age_s=60).load("abc") is None
