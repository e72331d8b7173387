"""The roles file over JSON (`/api/policies/rbac`, policies:manage): the text in force with its roles and the
registry of permissions, and replacing it while running (validated, refused when it would lock administration out,
written atomically, in force at once, audited). Thin handlers over `appliance.auth.roles_file.RolesFile`."""

from __future__ import annotations

from typing import Any

from litestar import Request, get, put
from litestar.datastructures import State

from appliance.admin.keys_routes import actor_of, decode_body
from appliance.admin.privacy_routes import PolicyBody
from appliance.auth.guards import permission
from appliance.auth.permissions import PERMISSIONS
from appliance.auth.rbac import RbacError
from appliance.auth.roles_file import RolesFile
from appliance.errors import InvalidPolicy


def _roles_file(state: State) -> RolesFile:
    roles_file: RolesFile = state.services.roles_file
    return roles_file


def _view(roles_file: RolesFile) -> dict[str, Any]:
    view = roles_file.view()
    return {"policy": view.text, "path": str(view.path), "editable": view.editable, "roles": view.roles,
            "permissions": dict(PERMISSIONS)}


@get("/api/policies/rbac", summary="The roles file in force (TOML), its roles and every permission there is",
     opt=permission("policies:manage"), tags=["Policies"])
async def get_rbac(state: State) -> dict[str, Any]:
    return _view(_roles_file(state))


@put("/api/policies/rbac", summary="Replace the roles file: validated, written atomically, in force at once, audited",
     opt=permission("policies:manage"), tags=["Policies"])
async def put_rbac(request: Request[Any, Any, Any], state: State) -> dict[str, Any]:
    body = decode_body(await request.body(), PolicyBody, '{"policy": "<the TOML text of rbac.toml>"}')
    roles_file = _roles_file(state)
    try:
        roles_file.replace(body.policy, role=request.user.role, actor=actor_of(request))
    except RbacError as exc:
        raise InvalidPolicy(exc.reason, line=exc.line) from None
    return _view(roles_file)


ROUTES = [get_rbac, put_rbac]
