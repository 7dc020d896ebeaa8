"""The async database engine and schema migration entry point."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(conn, _record):  # type: ignore[no-untyped-def]
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine.sync_engine, "handle_error")
        def _drop_readonly(context):  # type: ignore[no-untyped-def]
            # A connection opened while the file was read-only stays read-only after it is
            # writable again (SQLITE_READONLY on every write): treat it as broken, so the
            # pool replaces it instead of failing writes until a restart (edge, issue 18).
            if "readonly database" in str(context.original_exception):
                context.is_disconnect = True

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def migrate(url: str, revision: str = "head", *, downgrade: bool = False) -> None:
    """Upgrade (or downgrade) the schema. Safe to call from inside a running event loop:
    alembic's async env runs in a thread of its own."""
    from alembic import command

    error: list[BaseException] = []

    def run() -> None:
        try:
            cfg = _alembic_config(url)
            if downgrade:
                command.downgrade(cfg, revision)
            else:
                command.upgrade(cfg, revision)
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name="sluice-migrate")
    thread.start()
    thread.join()
    if error:
        raise error[0]
