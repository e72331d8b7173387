"""Single sign-on to the web UI: `GET /api/auth/methods` (what the sign-in page offers), `GET /api/auth/oidc/login`
(off to the provider) and `GET /api/auth/oidc/callback` (back from it, into a session); thin handlers over
`appliance.auth.oidc`. These are browser navigations, so a refusal sends the browser back to the sign-in page with
`?signin_error=<code>`, which the page turns into a message; the audit log has the details."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import Cookie, State
from litestar.response import Redirect

from appliance.admin.auth_routes import client_address, is_tls, session_cookie
from appliance.auth.guards import PUBLIC, permission
from appliance.auth.oidc import PENDING_SECONDS, OidcSignIn
from appliance.errors import ApplianceError, NotFound
from appliance.logs import get_logger

log = get_logger(__name__)

PENDING_COOKIE = "appliance_oidc"
TLS_PENDING_COOKIE = "__Host-appliance_oidc"
CALLBACK_PATH = "/api/auth/oidc/callback"


def pending_cookie(value: str, tls: bool, *, clear: bool = False) -> Cookie:
    """The sealed pending sign-in: SameSite=Lax, as the provider's redirect back is a cross-site navigation."""
    return Cookie(key=TLS_PENDING_COOKIE if tls else PENDING_COOKIE, value=value, path="/", httponly=True,
                  samesite="lax", secure=tls, max_age=0 if clear else PENDING_SECONDS)


def base_url(request: Request[Any, Any, Any]) -> str:
    """The appliance as this browser reaches it (the Host header was checked against server.allowed_hosts)."""
    return str(request.base_url).rstrip("/")


def _oidc(state: State) -> OidcSignIn:
    oidc: OidcSignIn | None = state.services.oidc
    if oidc is None:
        raise NotFound("single sign-on is not configured on this appliance; set [oidc] issuer and client_id",
                       code="oidc_not_configured")
    return oidc


def _back_to_signin(code: str | None, tls: bool) -> Redirect:
    return Redirect(f"/ui/?signin_error={code or 'oidc_failed'}", status_code=303,
                    cookies=[pending_cookie("", tls, clear=True)], headers={"cache-control": "no-store"})


@get("/api/auth/methods", summary="How one can sign in to the web UI", opt=permission(PUBLIC), tags=["Web UI"])
async def methods(state: State) -> Response[dict[str, Any]]:
    oidc: OidcSignIn | None = state.services.oidc
    sso = {"name": oidc.name, "url": "/api/auth/oidc/login"} if oidc is not None else None
    return Response({"password": state.services.settings.oidc.local_passwords, "sso": sso},
                    headers={"cache-control": "no-store"})


@get("/api/auth/oidc/login", summary="Start single sign-on: redirects to the identity provider",
     opt=permission(PUBLIC), tags=["Web UI"], status_code=302)
async def oidc_login(request: Request[Any, Any, State], state: State) -> Redirect:
    oidc, tls = _oidc(state), is_tls(request)
    redirect_uri = oidc.settings.redirect_uri or base_url(request) + CALLBACK_PATH
    try:
        url, sealed = await oidc.begin(redirect_uri)
    except ApplianceError as exc:
        log.warning("oidc.begin_failed", code=exc.code, error=exc.message[:300])
        return _back_to_signin(exc.code, tls)
    return Redirect(url, status_code=302, cookies=[pending_cookie(sealed, tls)], headers={"cache-control": "no-store"})


@get(CALLBACK_PATH, summary="Finish single sign-on: the identity provider redirects here", opt=permission(PUBLIC),
     tags=["Web UI"], status_code=303)
async def oidc_callback(request: Request[Any, Any, State], state: State) -> Redirect:
    oidc, tls = _oidc(state), is_tls(request)
    sealed = request.cookies.get(TLS_PENDING_COOKIE if tls else PENDING_COOKIE)
    params = {k: v for k, v in request.query_params.items() if isinstance(v, str)}
    try:
        session = await oidc.finish(params, sealed, client_address(request), request.headers.get("user-agent", ""))
    except ApplianceError as exc:
        log.info("oidc.sign_in_refused", code=exc.code, error=exc.message[:300])
        return _back_to_signin(exc.code, tls)
    return Redirect("/ui/", status_code=303, headers={"cache-control": "no-store"},
                    cookies=[session_cookie(session.token, tls), pending_cookie("", tls, clear=True)])


ROUTES = [methods, oidc_login, oidc_callback]
