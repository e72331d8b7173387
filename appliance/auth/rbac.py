"""Roles from policies/rbac.toml: loaded and validated at start, then asked `allows(role, permission)`."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from appliance.auth.permissions import ALL, PERMISSIONS
from appliance.resources import shipped
from appliance.toml_lines import LocatedError, locate, locate_value, syntax_error_line, validation_error_path

if TYPE_CHECKING:
    from appliance.audit import AuditLog

SHIPPED_RBAC = shipped("policies/rbac.toml")


class Role(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    permissions: list[str]
    description: str = ""


class RbacFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    roles: dict[str, Role]


class RbacError(LocatedError):
    """The roles file cannot be used; the message names the file, the role and what to fix (and the line, where
    it can be told: `line`)."""


class Rbac:
    def __init__(self, roles: dict[str, frozenset[str]], descriptions: dict[str, str] | None = None,
                 source: Path | None = None) -> None:
        self.roles = roles
        self.descriptions = descriptions or {}
        self.source = source

    @property
    def digest(self) -> str:
        """SHA-256 of what the roles grant (not of the file's text: comments and layout do not count)."""
        grants = {name: sorted(perms) for name, perms in sorted(self.roles.items())}
        return hashlib.sha256(json.dumps(grants, sort_keys=True).encode()).hexdigest()

    def record_if_changed(self, audit: AuditLog, actor: str = "supervisor") -> bool:
        """Audit `policy.change` when the roles differ from the last recorded ones (or none were recorded): those
        found at a start, or put in force through the API (`appliance.auth.roles_file`), not a refused change."""
        last = None
        for record in audit.export(action="policy.change"):  # the newest about the roles
            if record["target"] == "rbac" and record["outcome"] == "ok":
                last = record
        if last is not None and isinstance(last["details"], dict) and last["details"].get("digest") == self.digest:
            return False
        audit.record(actor, "policy.change", "rbac", digest=self.digest, source=str(self.source or ""),
                     roles={name: sorted(perms) for name, perms in sorted(self.roles.items())})
        return True

    @classmethod
    def load(cls, path: str | Path = "") -> Rbac:
        source = Path(path) if path else SHIPPED_RBAC
        try:
            text = source.read_text()
        except FileNotFoundError:
            raise RbacError(f"no roles file at {source}; set auth.rbac_file to the path of rbac.toml") from None
        return cls.parse(text, source)

    @classmethod
    def parse(cls, text: str, source: str | Path = "rbac.toml") -> Rbac:
        """Validate a roles document; RbacError names the line that is wrong where it can."""

        def fail(reason: str, line: int | None) -> RbacError:
            return RbacError(f"{source}{f' line {line}' if line else ''}: {reason}", line=line, reason=reason)

        try:
            parsed = msgspec.convert(tomllib.loads(text), RbacFile)
        except tomllib.TOMLDecodeError as exc:
            raise fail(f"not valid TOML: {exc}", syntax_error_line(exc, text)) from exc
        except msgspec.ValidationError as exc:
            path, message = validation_error_path(exc)
            raise fail(f"{'.'.join(path)}: {message}" if path else message, locate(text, path)) from exc
        roles: dict[str, frozenset[str]] = {}
        for name, role in parsed.roles.items():
            unknown = sorted(set(role.permissions) - PERMISSIONS.keys() - {ALL})
            if unknown:
                raise fail(f"role '{name}' grants unknown permission(s) {', '.join(unknown)}; known: "
                           f"{', '.join(PERMISSIONS)}", locate_value(text, ["roles", name, "permissions"], unknown[0]))
            if not role.permissions:
                raise fail(f"role '{name}' grants nothing; give it permissions or remove it",
                           locate(text, ["roles", name, "permissions"]))
            roles[name] = frozenset(PERMISSIONS) if ALL in role.permissions else frozenset(role.permissions)
        if not roles:
            raise fail("no roles defined; add one, e.g. [roles.admin] with permissions = [\"*\"]", None)
        source_path = Path(source) if isinstance(source, Path) else None
        return cls(roles, {name: role.description for name, role in parsed.roles.items()}, source_path)

    def adopt(self, other: Rbac) -> None:
        """Take `other`'s roles in place: whoever holds this object (the permission guard, RAG) sees them at once."""
        self.roles, self.descriptions, self.source = other.roles, other.descriptions, other.source

    def allows(self, role: str, permission: str) -> bool:
        return permission in self.roles.get(role, frozenset())

    def check_role(self, role: str) -> str:
        if role not in self.roles:
            raise RbacError(f"unknown role {role!r}; roles: {', '.join(self.roles)}")
        return role
