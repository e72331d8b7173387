"""Users over JSON for admins (`/api/users`, users:manage): list, create, change role, quota limits or disable;
thin handlers over `appliance.auth.users.UserService`. Never a password or its hash in a reply."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from appliance.admin.keys_routes import actor_of, decode_body
from appliance.auth.guards import permission
from appliance.auth.quotas import Limits
from appliance.auth.sessions import SessionPrincipal
from appliance.auth.users import LIMIT_FIELDS, User, UserService


class NewUser(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    role: str
    password: str
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None


class UserChange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: str | None = None
    disabled: bool | None = None
    rpm: int | msgspec.UnsetType | None = msgspec.UNSET  # null clears the limit; absent leaves it
    tpm: int | msgspec.UnsetType | None = msgspec.UNSET
    daily_tokens: int | msgspec.UnsetType | None = msgspec.UNSET

    def limits(self) -> dict[str, int | None]:
        return {name: value for name in LIMIT_FIELDS if (value := getattr(self, name)) is not msgspec.UNSET}


def acting_user_id(request: Request[Any, Any, Any]) -> str | None:
    """The caller's own user: the session's, or the owner of the API key (None for a key no user owns)."""
    principal = request.user
    if isinstance(principal, SessionPrincipal):
        return principal.user_id
    owner: str | None = getattr(principal, "owner_user_id", None)
    return owner


@get("/api/users", summary="List users", opt=permission("users:manage"), tags=["Admin"])
async def list_users(users: NamedDependency[UserService]) -> dict[str, Any]:
    return {"object": "list", "data": msgspec.to_builtins(users.list())}


@post("/api/users", summary="Create a user who logs in with a password", opt=permission("users:manage"),
      tags=["Admin"])
async def create_user(request: Request[Any, Any, Any], users: NamedDependency[UserService]) -> Response[User]:
    body = decode_body(await request.body(), NewUser, '{"name": "alice", "role": "user", "password": "..."}')
    user = users.create(body.name, body.role, body.password, actor=actor_of(request),  # ~40 ms of Argon2id; rare
                        limits=Limits(body.rpm, body.tpm, body.daily_tokens))
    return Response(user, status_code=201)


@patch("/api/users/{name:str}", summary="Change a user's role or quota limits, or disable or enable them",
       opt=permission("users:manage"), tags=["Admin"])
async def update_user(request: Request[Any, Any, Any], name: FromPath[str],
                      users: NamedDependency[UserService]) -> User:
    body = decode_body(await request.body(), UserChange,
                       '{"role": "auditor"}, {"disabled": true} or {"rpm": 60, "daily_tokens": null}')
    return users.update(name, role=body.role, disabled=body.disabled, actor=actor_of(request),
                        acting_user_id=acting_user_id(request), limits=body.limits())


ROUTES = [list_users, create_user, update_user]
