"""What one API key may touch, narrower than its role: `scopes` (permissions), `models` and `collections`.

Each is a list of names or None for no narrowing (the whole role, every model, every collection). A key's effective
permissions are its role's permissions (read per request, so an owned key follows its owner's role) intersected with
its scopes; `appliance.auth.guards.permission_guard` checks both. The gateway refuses a model outside `models` as if
it did not exist. `collections` is carried on the principal for RAG, which enforces it: a key with collections may
read and write only those (RAG's object-level checks still apply within them). Stored as JSON arrays in `api_keys`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from appliance.audit import API_KEY_SHAPE
from appliance.auth.permissions import PERMISSIONS
from appliance.errors import InvalidRequest

NAME_RE = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")
MAX_ITEMS = 100
_WHAT = {"scopes": "permissions", "models": "models", "collections": "collections"}


class Restrictions(msgspec.Struct, frozen=True):
    """A key's narrowing; None in a field is no narrowing."""

    scopes: list[str] | None = None
    models: list[str] | None = None
    collections: list[str] | None = None

    def details(self) -> dict[str, Any]:
        """The narrowed fields, for an audit record."""
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


NONE = Restrictions()


def split_names(text: str) -> list[str]:
    """`a,b, c` as a list (the CLI's form)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _names(field: str, names: Sequence[str] | None) -> list[str] | None:
    if names is None:
        return None
    unique = list(dict.fromkeys(names))
    if not unique:
        whole = "every permission of the role" if field == "scopes" else f"all {_WHAT[field]}"
        raise InvalidRequest(f"an empty {field} list allows nothing; leave {field} out for {whole}", param=field)
    if len(unique) > MAX_ITEMS:
        raise InvalidRequest(f"{field} lists at most {MAX_ITEMS} names; leave it out for no narrowing", param=field)
    for name in unique:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or API_KEY_SHAPE.search(name):
            raise InvalidRequest(f"{str(name)[:40]!r} is not a valid name in {field}; use letters, digits and "
                                 "._:/@+- (1 to 128 characters)", param=field)
    return unique


def check_shape(restrictions: Restrictions) -> Restrictions:
    """Names well-formed, no duplicates, no empty lists (before anything is audited: no key-shaped value there)."""
    return Restrictions(_names("scopes", restrictions.scopes), _names("models", restrictions.models),
                        _names("collections", restrictions.collections))


def check_scopes(scopes: Sequence[str] | None, role: str, grants: Mapping[str, frozenset[str]]) -> None:
    """Each scope must be a registered permission that `role` grants; the 400 names the first that is not."""
    for scope in scopes or ():
        if scope not in PERMISSIONS:
            raise InvalidRequest(f"unknown scope {scope!r}; scopes are permissions: {', '.join(PERMISSIONS)}",
                                 param="scopes", code="unknown_scope")
        if scope not in grants.get(role, frozenset()):
            raise InvalidRequest(f"the role {role!r} does not grant the scope {scope!r}, so a key with that role "
                                 "cannot have it; choose a role that grants it, or leave the scope out",
                                 param="scopes", code="scope_not_in_role")


def encode(names: list[str] | None) -> str | None:
    return json.dumps(names) if names is not None else None


def decode(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = json.loads(text)
    return [str(n) for n in names]
