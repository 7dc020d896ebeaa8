"""An operator's session in a real browser (Debian's Chromium via Playwright): log in,
create a tenant and a key, call the API with that key, find the calls on the usage page
and the overview's chart, revoke the key, see the next call refused, log out.
Screenshots of every page go to SCREENSHOTS (a temporary directory unless
SLUICE_SCREENSHOTS_DIR names one, e.g. docs/screenshots to refresh the README's)."""

from __future__ import annotations

import re
from typing import Any

import httpx
from openai import OpenAI

from tests.conftest import GatewayServer
from tests.e2e.conftest import ADMIN_PASSWORD, ADMIN_USER, SCREENSHOTS

CALLS = 3


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_operator_session(dashboard_server: GatewayServer, browser: Any) -> None:
    server = dashboard_server
    context = browser.new_context(base_url=server.base_url,
                                  viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the revoke confirmation
    blocked: list[str] = []  # what the Content-Security-Policy refused (inline code, ...)
    page.on("console", lambda m: blocked.append(m.text)
            if "Content Security Policy" in m.text else None)

    # Log in (the overview redirects there first).
    page.goto("/admin/")
    assert page.url.endswith("/admin/login?next=/admin/")
    shot(page, "login")
    page.fill("input[name=username]", ADMIN_USER)
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert page.locator(".error").inner_text() == "Wrong username or password."
    page.fill("input[name=username]", ADMIN_USER)
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url("**/admin/")
    assert page.locator("[data-stat=requests]").inner_text() == "0"

    # Create a tenant, with limits.
    page.click("nav >> text=Tenants")
    page.fill("input[name=name]", "acme")
    page.fill("input[name=rpm]", "600")
    page.click("text=Create tenant")
    page.wait_for_url(re.compile(r".*/admin/tenants/ten_\w+\?created=1"))
    assert page.locator(".notice").inner_text() == "Tenant created."
    page.fill("input[name=stripe_customer_id]", "cus_Acme123")
    page.fill("textarea[name=guard_policy]", '{"input_mode": "bogus"}')
    page.click("text=Save")
    assert "guard policy: input_mode" in page.locator(".error").inner_text()
    page.fill("textarea[name=guard_policy]", '{"input_mode": "flag", "output_mode": "block"}')
    page.click("text=Save")
    assert page.locator(".notice").inner_text() == "Saved."
    tenant = server.run(server.gateway.accounts.tenant("acme"))
    assert (tenant.rpm, tenant.stripe_customer_id) == (600, "cus_Acme123")
    assert tenant.guard_policy == {"input_mode": "flag", "output_mode": "block"}

    # Create a key on the tenant's page: its secret is shown once.
    page.fill("input[name=name]", "production")
    page.click("text=Create key")
    secret = page.locator("[data-secret]").inner_text().strip()
    assert secret.startswith("sk-") and len(secret) == 55
    shot(page, "key-created")

    # Real API calls with that key.
    client = OpenAI(base_url=server.base_url + "/v1", api_key=secret, max_retries=0)
    for i in range(CALLS):
        reply = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": f"hello number {i}"}])
        assert reply.usage is not None and reply.usage.completion_tokens > 0
    server.run(server.gateway.meter.flush())
    server.run(server.gateway.keys.flush_last_used())
    _guard_event(server)

    # The calls on the usage page (by tenant, then by model) and the overview's charts.
    page.click("nav >> text=Usage")
    assert page.locator("tr[data-group] td").first.inner_text() == "acme"
    assert page.locator("[data-total=requests]").inner_text() == str(CALLS)
    page.select_option("select[name=group_by]", "model")
    page.click("text=Show")
    assert page.locator("tr[data-group] td").first.inner_text() == "echo"
    shot(page, "usage")
    with page.expect_download() as download:
        page.click("text=Download CSV")
    csv = open(download.value.path()).read().splitlines()
    assert csv[0].startswith("id,request_id,")
    assert len(csv) == 1 + CALLS

    page.click("nav >> text=Overview")
    page.select_option("select[name=range]", "1h")  # submitted by dashboard.js
    page.wait_for_url("**/admin/?range=1h")
    assert page.locator("[data-stat=requests]").inner_text() == str(CALLS)
    chart = page.locator("figure[data-chart=Requests]")
    bars = chart.locator("rect.bar")
    assert sum(int(bars.nth(i).get_attribute("data-value")) for i in range(bars.count())) == CALLS
    assert "3 requests" in chart.locator("[data-summary]").inner_text()
    assert page.locator("figure[data-chart=Latency] polyline").count() == 2
    shot(page, "overview")

    page.click("nav >> text=Keys")
    row = page.locator("tr[data-key]").first
    assert "never" not in row.locator("td").nth(5).inner_text()  # last use recorded
    shot(page, "keys")
    page.click("nav >> text=Tenants")
    shot(page, "tenants")
    page.click("text=acme")
    shot(page, "tenant")
    page.click("nav >> text=Guard")
    assert page.locator("table.audit tbody tr").count() == 1
    shot(page, "guard")
    page.click("nav >> text=Runtime")
    echo = page.locator("section[data-backend=echo]")
    assert echo.locator("[data-stat=cold_starts]").inner_text() == "1"
    assert re.fullmatch(r"\d+ s", echo.locator("[data-countdown]").first.inner_text())
    shot(page, "runtime")

    # Revoke the key; the next call is refused.
    page.click("nav >> text=Keys")
    page.click("tr[data-key] >> text=Revoke")
    assert "Key revoked" in page.locator(".notice").inner_text()
    assert page.locator("tr[data-key] .badge").first.inner_text() == "revoked"
    r = httpx.post(server.base_url + "/v1/chat/completions",
                   headers={"authorization": f"Bearer {secret}"},
                   json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"

    # Every change is in the audit log under this admin's name, and the chain verifies.
    page.click("nav >> text=Audit log")
    assert page.locator("[data-chain=ok]").count() == 1
    page.fill("input[name=actor]", f"admin:{ADMIN_USER}")
    page.click("text=Filter")
    actions = page.locator("table.audit tbody tr td:nth-child(4)").all_inner_texts()
    for action in ("admin.login", "tenant.create", "tenant.update", "key.create",
                   "key.revoke", "usage.export"):
        assert action in actions, action
    shot(page, "audit")

    # A phone-sized view of the overview.
    phone = browser.new_context(base_url=server.base_url, viewport={"width": 390, "height": 844},
                                storage_state=context.storage_state())
    phone_page = phone.new_page()
    phone_page.goto("/admin/?range=1h")
    assert phone_page.locator("figure[data-chart=Requests] svg").is_visible()
    shot(phone_page, "overview-phone")
    phone.close()

    # Log out: the session is gone.
    page.click("text=Log out")
    page.wait_for_url("**/admin/login?logged_out=1")
    page.goto("/admin/keys")
    assert "/admin/login" in page.url
    assert blocked == []
    context.close()


def _guard_event(server: GatewayServer) -> None:
    """One guard verdict as the guard stage records it (this gateway runs without a guard
    model), so the guard page has a row to list."""
    tenant = server.run(server.gateway.accounts.tenant("acme"))
    key = server.run(server.gateway.accounts.list_keys("acme"))[0]

    async def record() -> None:
        await server.gateway.audit.record(
            tenant.name, "guard.input", key.id, request_id="req_guarddemo", decision="flag",
            details={"categories": ["S6"], "error": None, "model": "echo",
                     "prompt_sha256": "0" * 64, "prompt_chars": 42})
        await server.gateway.audit.flush()

    server.run(record())
