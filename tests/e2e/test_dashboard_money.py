"""The Money page in a real browser: set a price version, see a bad one refused, add a
tenant budget, see it listed with its spend, remove it; every change in the audit log."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import text

from tests.conftest import GatewayServer
from tests.e2e.conftest import ADMIN_PASSWORD, ADMIN_USER
from tests.e2e.test_dashboard_browser import shot


def test_prices_and_budgets_in_the_dashboard(dashboard_server: GatewayServer,
                                             browser: Any) -> None:
    server = dashboard_server
    server.tenant_key("acme")
    context = browser.new_context(base_url=server.base_url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto("/admin/login")
    page.fill("input[name=username]", ADMIN_USER)
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url("**/admin/")

    page.click("nav >> text=Money")
    assert "No prices yet" in page.locator("main").inner_text()
    page.select_option("select[name=model]", "echo")
    page.fill("input[name=input]", "1.5")
    page.fill("input[name=output]", "2")
    page.click("text=Add price version")
    assert "whole number" in page.locator(".error").inner_text()
    page.fill("input[name=input]", "600000")
    page.fill("input[name=output]", "1800000")
    page.click("text=Add price version")
    page.wait_for_url("**/admin/money?notice=Price+saved.")
    row = page.locator("#prices tbody tr").first.inner_text()
    assert "echo" in row and "600,000" in row and "1,800,000" in row
    price = server.gateway.spend.prices.price_at("echo", dt.datetime.now(dt.UTC))
    assert price is not None and price.output == 1_800_000  # in force at once

    page.fill("input[name=limit_micros]", "250000000")
    page.select_option("select[name=mode]", "soft")
    page.click("text=Add budget")
    page.wait_for_url("**notice=Budget+created.")
    budget = page.locator("#budgets tbody tr").first.inner_text()
    assert "tenant" in budget and "250,000,000" in budget and "soft" in budget
    shot(page, "money")
    page.click("#budgets >> text=Remove")
    page.wait_for_url("**notice=Budget+removed.")
    assert "acme has no budgets" in page.locator("main").inner_text()

    async def actions() -> list[str]:
        await server.gateway.audit.flush()
        async with server.gateway.db.connect() as conn:
            return [r[0] for r in await conn.execute(text("SELECT action FROM audit_log"))]
    done = server.run(actions())
    assert {"price.set", "budget.create", "budget.delete"} <= set(done)
    context.close()
