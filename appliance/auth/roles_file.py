"""The roles file in force (auth.rbac_file), read and replaced while the server runs: a new text is validated like
the file at start, refused when it would lock administration out, written atomically, swapped into the running
`Rbac` in place (with the services that keep their own copy of the roles) and audited as `policy.change`."""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from appliance.audit import AuditLog, audited
from appliance.auth.permissions import PERMISSIONS
from appliance.auth.rbac import SHIPPED_RBAC, Rbac
from appliance.crypto.files import atomic_write
from appliance.errors import Conflict

MANAGE = "policies:manage"
RolesListener = Callable[[Mapping[str, frozenset[str]]], None]


@dataclass(frozen=True)
class RolesView:
    text: str
    path: Path
    editable: bool
    roles: dict[str, dict[str, object]]


def lockouts(rbac: Rbac, role: str) -> list[str]:
    """Why a new set of roles would lock administration out when `role` (the caller's) changes it; empty: fine."""
    reasons = []
    if not any(granted >= frozenset(PERMISSIONS) for granted in rbac.roles.values()):
        reasons.append('no role would grant every permission ("*"), so nobody could administer the box; keep one, '
                       'e.g. [roles.admin] with permissions = ["*"]')
    if not rbac.allows(role, MANAGE):
        reasons.append(f"your role '{role}' would lose {MANAGE} (or go), so you could not undo this change; keep "
                       f"{MANAGE} in it, or let another admin make the change")
    return reasons


class RolesFile:
    def __init__(self, rbac: Rbac, audit: AuditLog, listeners: Iterable[RolesListener] = ()) -> None:
        """`listeners` are told the new roles after each change (services that keep their own copy of them)."""
        self.rbac = rbac
        self.audit = audit
        self.listeners = list(listeners)

    @property
    def path(self) -> Path:
        return self.rbac.source or SHIPPED_RBAC

    @property
    def editable(self) -> bool:
        """The shipped file is replaced by upgrades (and is read-only in a system install): it is never edited."""
        return self.path.resolve() != SHIPPED_RBAC.resolve()

    def view(self) -> RolesView:
        roles: dict[str, dict[str, object]] = {
            name: {"description": self.rbac.descriptions.get(name, ""), "permissions": sorted(granted)}
            for name, granted in self.rbac.roles.items()}
        return RolesView(self.path.read_text(), self.path, self.editable, roles)

    def replace(self, text: str, *, role: str, actor: str) -> Rbac:
        """Validate `text` (RbacError naming the line), refuse a lockout (Conflict), write, swap in place, audit."""
        path = self.path
        with audited(self.audit, actor, "policy.change", "rbac", source=str(path)) as event:
            if not self.editable:
                raise Conflict(f"the roles in force are the shipped {path}, which an upgrade replaces; copy it, set "
                               "auth.rbac_file to the copy and restart, then edit it here", code="policy_not_editable")
            new = Rbac.parse(text, path)
            if reasons := lockouts(new, role):
                raise Conflict("refused: " + "; ".join(reasons), code="policy_lockout")
            mode = stat.S_IMODE(path.stat().st_mode)
            atomic_write(path, text.encode(), mode=mode)
            self.rbac.adopt(new)
            for listener in self.listeners:
                listener(new.roles)
            event.details.update(digest=new.digest,
                                 roles={name: sorted(perms) for name, perms in sorted(new.roles.items())})
        return self.rbac
