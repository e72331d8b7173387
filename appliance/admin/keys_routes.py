"""API keys over JSON: `/api/keys` for admins (keys:manage: every key) and `/api/me/keys` for a logged-in user's
own keys (keys:own); thin handlers over `appliance.auth.keys.ApiKeyService`. Secrets are returned once, at
creation, under "key", and never listed. A key may be narrowed with "scopes", "models" and "collections"
(`appliance.auth.restrictions`); listings show them with the key's limits."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from appliance.auth.guards import permission
from appliance.auth.keys import ApiKey, ApiKeyService, parse_duration
from appliance.auth.quotas import Limits
from appliance.auth.restrictions import Restrictions
from appliance.auth.sessions import SessionPrincipal
from appliance.errors import InvalidRequest

Body = TypeVar("Body", bound=msgspec.Struct)
NO_STORE = {"cache-control": "no-store"}


class NewKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    role: str
    expires: str | None = None  # 30d, 12h, 10m, 5s; None never expires
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    scopes: list[str] | None = None  # permissions within the role; None: the whole role
    models: list[str] | None = None  # None: every model
    collections: list[str] | None = None  # None: every collection the role may use

    def narrowed(self) -> Restrictions:
        return Restrictions(self.scopes, self.models, self.collections)


class NewOwnKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    role: str | None = None  # a user's own key carries the user's role; another is refused
    expires: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    scopes: list[str] | None = None
    models: list[str] | None = None
    collections: list[str] | None = None

    def narrowed(self) -> Restrictions:
        return Restrictions(self.scopes, self.models, self.collections)


def decode_body(raw: bytes, kind: type[Body], example: str) -> Body:
    """The request body as `kind`, or a 400 that says what is wrong and what a good body looks like."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"{exc}; send e.g. {example}", code="invalid_body") from None
    except msgspec.DecodeError:
        raise InvalidRequest(f"the body is not JSON; send e.g. {example}", code="invalid_body") from None


def actor_of(request: Request[Any, Any, Any]) -> str:
    """Who the audit log names: `key:<id>` or `user:<id>`."""
    subject: str = request.user.subject
    return subject


def session_user(request: Request[Any, Any, Any]) -> SessionPrincipal:
    principal = request.user
    if not isinstance(principal, SessionPrincipal):
        raise InvalidRequest("/api/me/keys needs a logged-in user (the web UI session), not an API key; an admin "
                             "manages keys at /api/keys", code="needs_user")
    return principal


def _expiry(text: str | None) -> timedelta | None:
    return parse_duration(text) if text is not None else None


def _created(key: ApiKey, secret: str) -> Response[dict[str, Any]]:
    return Response({**msgspec.to_builtins(key), "key": secret}, status_code=201, headers=NO_STORE)


def _listing(keys: list[ApiKey]) -> dict[str, Any]:
    return {"object": "list", "data": msgspec.to_builtins(keys)}


KEY_EXAMPLE = ('{"name": "ci", "role": "user", "expires": "30d", "rpm": 60, "tpm": null, "daily_tokens": null, '
               '"scopes": ["chat:use", "models:read"], "models": null, "collections": null}')


@get("/api/keys", summary="List every API key (never a secret)", opt=permission("keys:manage"), tags=["Admin"])
async def list_keys(api_keys: NamedDependency[ApiKeyService]) -> dict[str, Any]:
    return _listing(api_keys.list())


@post("/api/keys", summary="Create an API key; its secret is in the reply once, under 'key'",
      opt=permission("keys:manage"), tags=["Admin"])
async def create_key(request: Request[Any, Any, Any], api_keys: NamedDependency[ApiKeyService]
                     ) -> Response[dict[str, Any]]:
    body = decode_body(await request.body(), NewKey, KEY_EXAMPLE)
    key, secret = api_keys.create(body.name, body.role, _expiry(body.expires), actor=actor_of(request),
                                  limits=Limits(body.rpm, body.tpm, body.daily_tokens), narrowed=body.narrowed())
    return _created(key, secret)


@delete("/api/keys/{key_id:str}", summary="Revoke an API key", status_code=200, opt=permission("keys:manage"),
        tags=["Admin"])
async def revoke_key(request: Request[Any, Any, Any], key_id: FromPath[str],
                     api_keys: NamedDependency[ApiKeyService]) -> ApiKey:
    return api_keys.revoke(key_id, actor=actor_of(request))


@get("/api/me/keys", summary="List the logged-in user's own API keys", opt=permission("keys:own"), tags=["Web UI"])
async def list_own_keys(request: Request[Any, Any, Any], api_keys: NamedDependency[ApiKeyService]
                        ) -> dict[str, Any]:
    return _listing(api_keys.list(owner_user_id=session_user(request).user_id))


@post("/api/me/keys", summary="Create an API key for the logged-in user, with the user's role",
      opt=permission("keys:own"), tags=["Web UI"])
async def create_own_key(request: Request[Any, Any, Any], api_keys: NamedDependency[ApiKeyService]
                         ) -> Response[dict[str, Any]]:
    user = session_user(request)
    body = decode_body(await request.body(), NewOwnKey, '{"name": "laptop", "expires": "30d"}')
    key, secret = api_keys.create_for_user(user.user_id, user.role, body.name, body.role, _expiry(body.expires),
                                           limits=Limits(body.rpm, body.tpm, body.daily_tokens),
                                           actor=user.subject, narrowed=body.narrowed())
    return _created(key, secret)


@delete("/api/me/keys/{key_id:str}", summary="Revoke one of the logged-in user's own API keys", status_code=200,
        opt=permission("keys:own"), tags=["Web UI"])
async def revoke_own_key(request: Request[Any, Any, Any], key_id: FromPath[str],
                         api_keys: NamedDependency[ApiKeyService]) -> ApiKey:
    user = session_user(request)
    return api_keys.revoke(key_id, actor=user.subject, owner_user_id=user.user_id)


ROUTES = [list_keys, create_key, revoke_key, list_own_keys, create_own_key, revoke_own_key]
