"""Users: people who log in with a name and a password (Argon2id), each with one role; created, listed, disabled,
enabled, given a new role or quota limits, every change audited. There is no default user and no default password.

A user's limits (rpm, tpm, daily_tokens; None is unlimited) apply to everything they do: their web session and every
key they made for themselves, together, counted as `user:<id>` (`appliance.auth.quotas`)."""

from __future__ import annotations

import re
import sqlite3
import uuid
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from appliance.audit import API_KEY_SHAPE, AuditLog, audited
from appliance.auth.passwords import DEFAULT_PARAMS, MAX_LENGTH, Argon2Params, PasswordHasher, check_password
from appliance.auth.quotas import UNLIMITED, Limits
from appliance.auth.rbac import Rbac
from appliance.errors import Forbidden, InvalidRequest, NotFound
from appliance.logs import get_logger

log = get_logger(__name__)

# ASCII only: SQLite's NOCASE folds ASCII letters, so `Alice` and `ALICE` are one name and nothing else collides.
NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_FIELDS = ("id", "name", "role", "disabled_at", "created_at", "password_changed_at", "rpm", "tpm", "daily_tokens")
_SELECT = ("SELECT id, name, role, disabled_at, created_at, password_changed_at, rpm, tpm, daily_tokens, "
           "password_hash FROM users")
LIMIT_FIELDS = ("rpm", "tpm", "daily_tokens")
NO_PASSWORD = "!sso"  # noqa: S105 (no password matches it): the hash of a user who signs in at a provider


class User(msgspec.Struct, frozen=True):
    id: str
    name: str
    role: str
    disabled_at: str | None
    created_at: str
    password_changed_at: str
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None

    @property
    def limits(self) -> Limits:
        return Limits(self.rpm, self.tpm, self.daily_tokens)


def check_limits(changes: Mapping[str, int | None]) -> None:
    """Each limit a positive whole number, or None for no limit."""
    for limit, value in changes.items():
        if limit not in LIMIT_FIELDS:
            raise InvalidRequest(f"unknown limit {limit!r}; limits: {', '.join(LIMIT_FIELDS)}", param=limit)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise InvalidRequest(f"{limit} must be a positive number of {'requests' if limit == 'rpm' else 'tokens'}"
                                 "; use null (or `none` on the command line) for no limit", param=limit)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"{name[:80]!r} is not a valid user name; use 1 to 64 letters, digits, '.', '_', '-' "
                             "or '@' (e.g. alice or alice@example.com)", param="name")
    if API_KEY_SHAPE.search(name):
        raise InvalidRequest("a user name must not look like an API key; choose another name", param="name")
    return name


def _user(row: sqlite3.Row) -> User:
    """The public view of a row: never the password hash."""
    return msgspec.convert({k: row[k] for k in _FIELDS}, User)


class UserService:
    def __init__(self, conn: sqlite3.Connection, pepper: bytes | None, audit: AuditLog | None = None,
                 roles: Collection[str] | None = None, params: Argon2Params = DEFAULT_PARAMS) -> None:
        self.conn = conn
        self.audit = audit
        self.roles = tuple(roles) if roles is not None else tuple(Rbac.load().roles)
        self.hasher = PasswordHasher(params, pepper)
        self._dummy_hash = self.hasher.dummy_hash()

    def use_roles(self, roles: Collection[str]) -> None:
        """The roles a user may be given from now on (the roles file changed while running)."""
        self.roles = tuple(roles)

    def _check_role(self, role: str) -> str:
        if role not in self.roles:
            raise InvalidRequest(f"unknown role {role!r}; roles: {', '.join(self.roles)}", param="role")
        return role

    def check_new(self, name: str, role: str) -> None:
        """Refuse a bad name, an unknown role or a taken name, before anyone types a password for it."""
        check_name(name)
        self._check_role(role)
        if self._find(name) is not None:
            raise self._exists(name)

    def create(self, name: str, role: str, password: str, *, actor: str = "system", limits: Limits = UNLIMITED
               ) -> User:
        """Create a user; the password is checked against the policy and stored only as its hash."""
        quotas = {k: v for k, v in msgspec.structs.asdict(limits).items() if v is not None}
        with audited(self.audit, actor, "user.create", name=name[:80], role=role, **quotas) as event:
            check_limits(quotas)
            self.check_new(name, role)
            check_password(password, name)
            password_hash = self.hasher.hash(password)  # before the write lock: hashing takes tens of ms
            user_id, now = uuid.uuid4().hex, _now()
            event.target = user_id
            with event.commit():
                try:
                    self.conn.execute("INSERT INTO users(id, name, role, password_hash, created_at, "
                                      "password_changed_at, rpm, tpm, daily_tokens) VALUES (?,?,?,?,?,?,?,?,?)",
                                      (user_id, name, role, password_hash, now, now, limits.rpm, limits.tpm,
                                       limits.daily_tokens))
                except sqlite3.IntegrityError:  # created meanwhile by another process
                    raise self._exists(name) from None
        return self.get(name)

    def create_linked(self, name: str, role: str, issuer: str, subject: str, *, actor: str) -> User:
        """A user created at their first sign-in through an OpenID Provider: linked to (issuer, subject), with no
        password. Audited as `user.create` with `via: oidc`."""
        with audited(self.audit, actor, "user.create", name=name[:80], role=role, via="oidc") as event:
            self.check_new(name, role)
            user_id, now = uuid.uuid4().hex, _now()
            event.target = user_id
            with event.commit():
                try:
                    self.conn.execute("INSERT INTO users(id, name, role, password_hash, created_at, "
                                      "password_changed_at, oidc_issuer, oidc_subject) VALUES (?,?,?,?,?,?,?,?)",
                                      (user_id, name, role, NO_PASSWORD, now, now, issuer, subject))
                except sqlite3.IntegrityError:  # the same person signing in twice at once, or the name taken
                    raise self._exists(name) from None
        return self.get(name)

    def find_linked(self, issuer: str, subject: str) -> User | None:
        """The user linked to this provider's subject, if any."""
        row = self.conn.execute(_SELECT + " WHERE oidc_issuer = ? AND oidc_subject = ?", (issuer, subject)).fetchone()
        return _user(row) if row is not None else None

    @staticmethod
    def _exists(name: str) -> InvalidRequest:
        return InvalidRequest(f"a user named {name!r} already exists (names ignore case); choose another name, or "
                              "change the existing user with `appliance users set-role` or `users enable`",
                              param="name", code="user_exists")

    def _find(self, name: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(_SELECT + " WHERE name = ?", (name,)).fetchone()
        return row

    def get(self, name: str) -> User:
        row = self._find(name)
        if row is None:
            raise NotFound(f"no user named {name[:80]!r}; `appliance users list` shows the users", param="name")
        return _user(row)

    def list(self) -> list[User]:
        return [_user(r) for r in self.conn.execute(_SELECT + " ORDER BY created_at, name").fetchall()]

    def _set_disabled(self, name: str, disabled: bool, actor: str) -> User:
        action = "user.disable" if disabled else "user.enable"
        with audited(self.audit, actor, action, name=name[:80]) as event:
            user = self.get(name)
            event.target = user.id
            event.details.update(name=user.name, role=user.role)
            with event.commit():
                if disabled:
                    changed = self.conn.execute("UPDATE users SET disabled_at = ? WHERE id = ? AND "
                                                "disabled_at IS NULL", (_now(), user.id)).rowcount
                else:
                    changed = self.conn.execute("UPDATE users SET disabled_at = NULL WHERE id = ? AND "
                                                "disabled_at IS NOT NULL", (user.id,)).rowcount
                if not changed:
                    event.details["unchanged"] = True
        return self.get(name)

    def disable(self, name: str, *, actor: str = "system") -> User:
        """A disabled user cannot log in; their data and audit trail stay. `enable` undoes it."""
        return self._set_disabled(name, True, actor)

    def enable(self, name: str, *, actor: str = "system") -> User:
        return self._set_disabled(name, False, actor)

    def set_role(self, name: str, role: str, *, actor: str = "system") -> User:
        with audited(self.audit, actor, "user.set_role", name=name[:80], role=role) as event:
            self._check_role(role)
            user = self.get(name)
            event.target = user.id
            event.details.update(name=user.name, previous_role=user.role)
            with event.commit():
                self.conn.execute("UPDATE users SET role = ? WHERE id = ?", (role, user.id))
        return self.get(name)

    def set_limits(self, name: str, changes: Mapping[str, int | None], *, actor: str = "system") -> User:
        """Set or clear (None) some of a user's limits; the others stay. Audited as `user.update`."""
        requested: dict[str, Any] = dict(changes)
        with audited(self.audit, actor, "user.update", name=name[:80], **requested) as event:
            check_limits(changes)
            user = self.get(name)
            event.target = user.id
            event.details.update(name=user.name, previous={k: getattr(user, k) for k in changes})
            if changes:
                new = {**msgspec.structs.asdict(user.limits), **changes}
                with event.commit():
                    self.conn.execute("UPDATE users SET rpm = ?, tpm = ?, daily_tokens = ? WHERE id = ?",
                                      (new["rpm"], new["tpm"], new["daily_tokens"], user.id))
        return self.get(user.name)

    def update(self, name: str, *, role: str | None = None, disabled: bool | None = None, actor: str = "system",
               acting_user_id: str | None = None, limits: Mapping[str, int | None] | None = None) -> User:
        """Change a user's role, limits (None clears one) and/or disable or enable them. `acting_user_id` is the
        caller's own user (if any): nobody changes their own role or disables themselves this way, so an admin
        cannot lock the box out alone."""
        if role is None and disabled is None and not limits:
            raise InvalidRequest('nothing to change; send "role", "disabled", "rpm", "tpm" and/or "daily_tokens"',
                                 code="empty_update")
        user = self.get(name)
        if user.id == acting_user_id and ((role is not None and role != user.role) or disabled):
            refusal = Forbidden("you cannot change your own role or disable yourself; ask another admin to do it "
                                "(or use `appliance users` on the box)", code="self_change_refused")
            if self.audit is not None:
                self.audit.record_failure(actor, "user.update", user.id, refusal, name=user.name,
                                          **({"role": role[:80]} if role is not None else {}),
                                          **({"disabled": disabled} if disabled is not None else {}))
            raise refusal
        if limits and role is not None and role != user.role:
            check_limits(limits)  # all or nothing: a bad limit must not leave the role changed
            self._check_role(role)
        if role is not None and role != user.role:
            self.set_role(user.name, role, actor=actor)
        if limits:
            self.set_limits(user.name, limits, actor=actor)
        if disabled is not None and disabled != user.disabled:
            self._set_disabled(user.name, disabled, actor)
        return self.get(user.name)

    def verify_password(self, name: str, password: str) -> User | None:
        """The user when the name and password match an enabled user, else None. Unknown names cost one hash too,
        so that response time does not tell which names exist. An outdated hash is replaced on success."""
        row = self._find(name) if NAME_RE.fullmatch(name) else None
        if row is not None and row["password_hash"] == NO_PASSWORD:  # signs in through the provider only
            row = None
        stored = row["password_hash"] if row is not None else self._dummy_hash
        candidate = password if len(password) <= MAX_LENGTH else ""  # cannot match; still costs one hash
        matched, upgraded = self.hasher.verify_and_update(candidate, stored)
        if not matched or row is None or row["disabled_at"] is not None:
            return None
        if upgraded is not None:
            self.conn.execute("UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?",
                              (upgraded, row["id"], stored))
            log.info("user.password_rehashed", user_id=row["id"])
        return _user(row)
