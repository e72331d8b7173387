"""Web UI login: `POST /api/auth/login`, `POST /api/auth/logout` and `GET /api/me`; thin handlers over
`appliance.auth.sessions`. The session cookie is `__Host-appliance_session` over TLS, else `appliance_session`."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import Cookie, State
from litestar.openapi import ResponseSpec

from appliance.auth.guards import PUBLIC, effective_permissions, permission
from appliance.auth.sessions import LoginService, SessionPrincipal
from appliance.errors import InvalidRequest

COOKIE = "appliance_session"
TLS_COOKIE = "__Host-appliance_session"


class LogoutAtProvider(msgspec.Struct, frozen=True):
    end_session_url: str


class LoginRequest(msgspec.Struct, frozen=True):
    username: str
    password: str


def is_tls(request: Request[Any, Any, Any]) -> bool:
    return request.scope.get("scheme") == "https"


def cookie_name(tls: bool) -> str:
    return TLS_COOKIE if tls else COOKIE


def session_cookie(value: str, tls: bool, *, clear: bool = False) -> Cookie:
    """HttpOnly, SameSite=Strict, Path=/, Secure over TLS; no Max-Age: the server decides when a session ends."""
    return Cookie(key=cookie_name(tls), value=value, path="/", httponly=True, samesite="strict", secure=tls,
                  max_age=0 if clear else None)


def client_address(request: Request[Any, Any, Any]) -> str:
    return request.client.host if request.client else ""


def _logins(state: State) -> LoginService:
    logins: LoginService = state.services.logins
    return logins


@post("/api/auth/login", summary="Log in to the web UI with a user name and password", status_code=200,
      opt=permission(PUBLIC), tags=["Web UI"])
async def login(request: Request[Any, Any, State], state: State) -> Response[dict[str, Any]]:
    try:
        body = msgspec.json.decode(await request.body(), type=LoginRequest)
    except msgspec.DecodeError:
        raise InvalidRequest('send JSON {"username": "...", "password": "..."}', code="invalid_body") from None
    session = await _logins(state).login(body.username, body.password, client_address(request),
                                         request.headers.get("user-agent", ""))
    tls = is_tls(request)
    return Response({"user": {"name": session.user.name, "role": session.user.role},
                     "csrf_token": session.csrf_token, "expires_at": session.expires_at},
                    cookies=[session_cookie(session.token, tls)], headers={"cache-control": "no-store"})


@post("/api/auth/logout", summary="End this web UI session", status_code=200, opt=permission("self:read"),
      tags=["Web UI"], description="204 when the session ended; 200 with end_session_url when it began at the "
      "identity provider, where the browser may go to sign out there too",
      responses={204: ResponseSpec(None, description="The session ended")})
async def logout(request: Request[Any, Any, State], state: State) -> Response[LogoutAtProvider | None]:
    principal = request.user
    if not isinstance(principal, SessionPrincipal):
        raise InvalidRequest("this request used an API key, not a session: there is no session to end; revoke "
                             "the key with `appliance keys revoke` instead", code="no_session")
    id_token = _logins(state).logout(principal, client_address(request))
    cookies = [session_cookie("", is_tls(request), clear=True)]
    oidc = state.services.oidc
    if id_token and oidc is not None:
        back = oidc.settings.post_logout_redirect_uri or str(request.base_url).rstrip("/") + "/ui/"
        if url := await oidc.end_session_url(id_token, back):
            return Response(LogoutAtProvider(url), status_code=200, cookies=cookies,
                            headers={"cache-control": "no-store"})
    return Response(None, status_code=204, cookies=cookies)


@get("/api/me", summary="Who this request acts as", opt=permission("self:read"), tags=["Web UI"])
async def me(request: Request[Any, Any, State], state: State) -> Response[dict[str, Any]]:
    principal = request.user
    granted = effective_permissions(principal, state.services.rbac)
    narrowed = {name: sorted(value) for name in ("scopes", "models", "collections")
                if (value := getattr(principal, name, None)) is not None}
    # a page reloaded in the browser learns its session's CSRF token here: the cookie is HttpOnly and SameSite=Strict,
    # and another origin cannot read this reply, so the UI never has to keep the token in storage
    session = {"csrf_token": principal.csrf_token} if isinstance(principal, SessionPrincipal) else {}
    return Response({"name": principal.name, "role": principal.role, "permissions": sorted(granted), **narrowed,
                     "via": "session" if session else "api_key", **session},
                    headers={"cache-control": "no-store"})


ROUTES = [login, logout, me]
