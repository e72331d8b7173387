"""One guard for every route: the route names its permission in `opt["permission"]`; the caller's role must
grant it and, for an API key with scopes, its scopes must include it (effective permissions = role's permissions
intersected with scopes). A route that names none is refused (fail closed), and the route test proves every route
names one."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from appliance.auth.permissions import PERMISSIONS
from appliance.auth.rbac import Rbac
from appliance.errors import Forbidden

PUBLIC = "public"


def permission(name: str) -> dict[str, str]:
    """`opt=` for a route handler: the one permission it requires (or PUBLIC)."""
    if name != PUBLIC and name not in PERMISSIONS:
        raise ValueError(f"unregistered permission {name!r}; add it to appliance/auth/permissions.py")
    return {"permission": name}


async def permission_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    # async although it never waits: Litestar runs a sync guard in a worker thread, a hop that cost each request
    # about a millisecond (tests/benchmarks/bench_remote.py)
    required = handler.opt.get("permission")
    if required == PUBLIC:
        return
    principal = connection.scope.get("user")
    rbac = connection.app.state.services.rbac
    if required is not None and principal is not None and rbac.allows(principal.role, required):
        scopes: frozenset[str] | None = getattr(principal, "scopes", None)
        if scopes is None or required in scopes:
            return
        raise Forbidden(
            f"this API key's scopes ({', '.join(sorted(scopes))}) leave out the permission '{required}' that "
            f"{connection.url.path} needs; create a key whose --scopes include it, or one without --scopes",
            code="insufficient_permissions",
        )
    raise Forbidden(
        f"the role '{getattr(principal, 'role', '?')}' lacks the permission "
        f"'{required or 'undeclared'}' that {connection.url.path} needs; "
        "ask an admin for a key or a user role that grants it",
        code="insufficient_permissions",
    )


def effective_permissions(principal: Any, rbac: Rbac) -> frozenset[str]:
    """What a principal may do: its role's permissions, narrowed by its scopes when it has them."""
    granted = rbac.roles.get(principal.role, frozenset())
    scopes: frozenset[str] | None = getattr(principal, "scopes", None)
    return granted if scopes is None else granted & scopes
