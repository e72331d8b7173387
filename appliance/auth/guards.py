"""One guard for every route: the route names its permission in `opt["permission"]`; the caller's role must
grant it. A route that names none is refused (fail closed), and the route test proves every route names one."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from appliance.auth.permissions import PERMISSIONS
from appliance.errors import Forbidden

PUBLIC = "public"


def permission(name: str) -> dict[str, str]:
    """`opt=` for a route handler: the one permission it requires (or PUBLIC)."""
    if name != PUBLIC and name not in PERMISSIONS:
        raise ValueError(f"unregistered permission {name!r}; add it to appliance/auth/permissions.py")
    return {"permission": name}


def permission_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    required = handler.opt.get("permission")
    if required == PUBLIC:
        return
    principal = connection.scope.get("user")
    rbac = connection.app.state.services.rbac
    if required is None or principal is None or not rbac.allows(principal.role, required):
        raise Forbidden(
            f"the role '{getattr(principal, 'role', '?')}' lacks the permission "
            f"'{required or 'undeclared'}' that {connection.url.path} needs; "
            "ask an admin for a key or a user role that grants it",
            code="insufficient_permissions",
        )
