"""Tenants and keys: list, create, edit limits and policy, disable, revoke.

Every change goes through :class:`gateway.accounts.Accounts` with ``actor="admin:<name>"``,
so it lands in the audit log like a change made through the admin API or the CLI.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from sluice.gateway.accounts.tenants import parse_duration
from sluice.gateway.dashboard.session import Session
from sluice.gateway.dashboard.web import action, optional_int, page, render, text
from sluice.gateway.errors import NotFound, SluiceError
from sluice.gateway.state import app_state
from sluice.gateway.pipeline.guard import GuardPolicy


async def _tenants_page(request: Request, session: Session, *, error: str = "",
                        form: dict[str, str] | None = None, status: int = 200) -> Response:
    tenants = await app_state(request).accounts.list_tenants()
    return render(request, "tenants.html", {"tenants": tenants, "error": error,
                                            "form": form or {}}, session=session, status=status)


@page("tenants")
async def tenants(request: Request, session: Session) -> Response:
    return await _tenants_page(request, session)


@action("tenants")
async def create_tenant(request: Request, session: Session, form: FormData) -> Response:
    try:
        tenant = await app_state(request).accounts.create_tenant(
            text(form, "name"), rpm=optional_int(form, "rpm"), tpm=optional_int(form, "tpm"),
            actor=session.actor)
    except (SluiceError, ValueError) as exc:
        return await _tenants_page(request, session, error=_message(exc), status=400,
                                   form={k: text(form, k) for k in ("name", "rpm", "tpm")})
    return RedirectResponse(f"/admin/tenants/{tenant.id}?created=1", status_code=303)


async def _tenant_page(request: Request, session: Session, *, error: str = "",
                       status: int = 200, submitted: FormData | None = None) -> Response:
    """The tenant's settings and keys; after a refused change, the form as it was sent."""
    state = app_state(request)
    try:
        tenant = await state.accounts.tenant(request.path_params["tenant"])
    except NotFound as exc:
        return render(request, "error.html", {"title": "No such tenant", "message": exc.message},
                      session=session, status=404)
    keys = await state.accounts.list_keys(tenant.id)
    values = {
        "rpm": tenant.rpm or "", "tpm": tenant.tpm or "",
        "stripe_customer_id": tenant.stripe_customer_id or "",
        "disabled": tenant.disabled, "store_prompts": tenant.store_prompts,
        "guard_policy": json.dumps(tenant.guard_policy, indent=2) if tenant.guard_policy else "",
    }
    if submitted is not None:
        values.update({name: text(submitted, name) for name in
                       ("rpm", "tpm", "stripe_customer_id", "guard_policy")})
        values.update({name: submitted.get(name) == "on"
                       for name in ("disabled", "store_prompts")})
    q = request.query_params
    notice = "Tenant created." if q.get("created") else "Saved." if q.get("saved") else ""
    return render(request, "tenant.html", {
        "tenant": tenant, "keys": keys, "error": error, "notice": notice,
        "values": values, "models": [c.id for c in state.registry.cards()],
    }, session=session, status=status)


@page("tenants")
async def tenant(request: Request, session: Session) -> Response:
    return await _tenant_page(request, session)


def _policy(raw: str) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"guard policy is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("guard policy must be a JSON object, e.g. {\"input_mode\": \"flag\"}")
    try:
        GuardPolicy.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "policy"
        raise ValueError(f"guard policy: {where}: {err['msg']}") from None
    return value


@action("tenants")
async def update_tenant(request: Request, session: Session, form: FormData) -> Response:
    state = app_state(request)
    ref = request.path_params["tenant"]
    try:
        changes = {
            "disabled": form.get("disabled") == "on",
            "store_prompts": form.get("store_prompts") == "on",
            "rpm": optional_int(form, "rpm"),
            "tpm": optional_int(form, "tpm"),
            "stripe_customer_id": text(form, "stripe_customer_id") or None,
            "guard_policy": _policy(text(form, "guard_policy")),
        }
        if (customer := changes["stripe_customer_id"]) and len(customer) > 64:
            raise ValueError("Stripe customer id is at most 64 characters")
        updated = await state.accounts.update_tenant(ref, actor=session.actor, **changes)
    except (SluiceError, ValueError) as exc:
        return await _tenant_page(request, session, error=_message(exc), status=400,
                                  submitted=form)
    state.keys.invalidate()  # limits, policy and the disabled flag are cached with the keys
    return RedirectResponse(f"/admin/tenants/{updated.id}?saved=1", status_code=303)


async def _keys_page(request: Request, session: Session, *, error: str = "",
                     status: int = 200) -> Response:
    state = app_state(request)
    all_tenants = await state.accounts.list_tenants()
    names = {t.id: t.name for t in all_tenants}
    keys = await state.accounts.list_keys()
    return render(request, "keys.html", {
        "keys": sorted(keys, key=lambda k: k.created_at, reverse=True), "names": names,
        "tenants": all_tenants, "error": error, "models": [c.id for c in state.registry.cards()],
        "selected": request.query_params.get("tenant", ""),
        "revoked": request.query_params.get("revoked", ""),
    }, session=session, status=status)


@page("keys")
async def keys(request: Request, session: Session) -> Response:
    return await _keys_page(request, session)


@action("keys")
async def create_key(request: Request, session: Session, form: FormData) -> Response:
    state = app_state(request)
    try:
        expires = text(form, "expires_in")
        models = [m.strip() for m in text(form, "models").split(",") if m.strip()]
        created = await state.accounts.create_key(
            text(form, "tenant"), name=text(form, "name")[:128], models=models or None,
            expires_in=parse_duration(expires) if expires else None,
            rpm=optional_int(form, "rpm"), tpm=optional_int(form, "tpm"), actor=session.actor)
        owner = await state.accounts.tenant(created.key.tenant_id)
    except (SluiceError, ValueError) as exc:
        return await _keys_page(request, session, error=_message(exc), status=400)
    # The secret is rendered into this one response and never stored or redirected with.
    return render(request, "key_created.html", {"key": created.key, "secret": created.secret,
                                                "tenant": owner}, session=session, status=201)


@action("keys")
async def revoke_key(request: Request, session: Session, form: FormData) -> Response:
    state = app_state(request)
    try:
        key = await state.accounts.revoke_key(request.path_params["key"], actor=session.actor)
    except SluiceError as exc:
        return await _keys_page(request, session, error=_message(exc), status=404)
    state.keys.invalidate(key.prefix)
    back = text(form, "back")
    target = back if back.startswith("/admin/tenants/") and "//" not in back else "/admin/keys"
    separator = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{separator}revoked={key.id}", status_code=303)


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, SluiceError) else str(exc)
