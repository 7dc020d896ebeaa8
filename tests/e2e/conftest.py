"""A real gateway (uvicorn in a thread, SQLite) with the dashboard mounted and one admin,
and a headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayServer, echo_settings

CHROMIUM = os.environ.get("SLUICE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ADMIN_USER = "alice"
ADMIN_PASSWORD = "correct horse battery staple"
# Screenshots go to a temporary directory, so a test run leaves the checkout as it was;
# refresh the README's with SLUICE_SCREENSHOTS_DIR=docs/screenshots.
SCREENSHOTS = Path(os.environ.get("SLUICE_SCREENSHOTS_DIR")
                   or tempfile.mkdtemp(prefix="sluice-screenshots-"))


def mount_dashboard(server: GatewayServer) -> None:
    """Append the dashboard's routes unless create_app already mounts them."""
    from sluice.gateway import dashboard
    from sluice.gateway.dashboard.security import DashboardMount

    if not any(isinstance(r, DashboardMount) for r in server.app.router.routes):
        server.app.router.routes.extend(dashboard.routes)


@pytest.fixture
def dashboard_server(sqlite_url: str) -> Iterator[GatewayServer]:
    from sluice.gateway.accounts.admins import create_admin

    server = GatewayServer(echo_settings(sqlite_url, admin_jwt_ttl_s=600))
    mount_dashboard(server)
    server.start()
    server.run(create_admin(server.gateway.accounts.sessions, ADMIN_USER, ADMIN_PASSWORD))
    yield server
    server.stop()


@pytest.fixture(scope="module")  # closed before other modules use asyncio
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: the dashboard's browser tests need Debian's Chromium "
            "(apt-get install -y chromium), or SLUICE_TEST_CHROMIUM pointing at one",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
