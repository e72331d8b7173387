"""API keys: `apl_` + key id + secret + checksum, shown once, stored only as an HMAC with a server pepper.

A key made by a user for themselves (`create_for_user`) has an owner: it acts with the owner's current role, stops
working while the owner is disabled, and goes when the owner is deleted; only its owner may revoke it that way.
Its requests spend both its own quota (`key:<id>`) and its owner's (`user:<id>`).

A key may be narrower than its role: scopes, models and collections (`appliance.auth.restrictions`)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import string
import zlib
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta

import msgspec

from appliance.audit import AuditLog, audited
from appliance.auth import restrictions
from appliance.auth.permissions import PERMISSIONS
from appliance.auth.quotas import UNLIMITED, Limits
from appliance.auth.rbac import Rbac
from appliance.auth.restrictions import NONE, Restrictions
from appliance.errors import Forbidden, InvalidRequest, KeyNotFound, Unauthenticated
from appliance.logs import get_logger

log = get_logger(__name__)
PREFIX = "apl_"
ALPHABET = string.ascii_letters + string.digits
ID_LEN, SECRET_LEN, CHECK_LEN = 8, 32, 6
KEY_RE = re.compile(rf"^{PREFIX}([A-Za-z0-9]{{{ID_LEN}}})([A-Za-z0-9]{{{SECRET_LEN}}})([A-Za-z0-9]{{{CHECK_LEN}}})$")
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
LAST_USED_RESOLUTION = timedelta(minutes=1)
SELECT_KEYS = ("SELECT id, name, role, created_at, expires_at, revoked_at, last_used_at, rpm, tpm, daily_tokens, "
               "owner_user_id, scopes, models, collections FROM api_keys")


class ApiKey(msgspec.Struct, frozen=True):
    id: str
    name: str
    role: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    owner_user_id: str | None = None
    scopes: list[str] | None = None  # None: every permission of the role
    models: list[str] | None = None  # None: every model
    collections: list[str] | None = None  # None: every collection the role may use

    @property
    def limits(self) -> Limits:
        return Limits(self.rpm, self.tpm, self.daily_tokens)


def _key(row: sqlite3.Row) -> ApiKey:
    fields = dict(row)
    for name in ("scopes", "models", "collections"):
        fields[name] = restrictions.decode(fields[name])
    return msgspec.convert(fields, ApiKey)


class Principal(msgspec.Struct, frozen=True):
    """Who a request with an API key acts as. `scopes`, `models` and `collections` narrow the role (None: no
    narrowing); RAG enforces `collections`."""

    key_id: str
    name: str
    role: str
    limits: Limits = UNLIMITED
    owner_user_id: str | None = None  # the user who made this key for themselves, if one did
    owner_limits: Limits = UNLIMITED  # that user's own limits, which this key spends too
    scopes: frozenset[str] | None = None
    models: frozenset[str] | None = None
    collections: tuple[str, ...] | None = None

    @property
    def subject(self) -> str:
        """Who acts, for the audit log, and whose quota the key's own limits count against."""
        return f"key:{self.key_id}"

    @property
    def quotas(self) -> tuple[tuple[str, Limits], ...]:
        """Every (subject, limits) a request spends: the key's, and its owner's when a user owns it."""
        own = ((self.subject, self.limits),)
        return (*own, (f"user:{self.owner_user_id}", self.owner_limits)) if self.owner_user_id else own


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise InvalidRequest(f"{text!r} is not a duration; use a number and a unit, e.g. 30d, 12h, 10m, 5s",
                             param="expires")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _encode_base62(number: int, width: int) -> str:
    out = []
    for _ in range(width):
        number, rem = divmod(number, len(ALPHABET))
        out.append(ALPHABET[rem])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _encode_base62(zlib.crc32(body.encode()), CHECK_LEN)


def _whole_second_ceiling(moment: datetime) -> datetime:
    """Stored times have whole seconds; round an expiry up so that a key never expires early."""
    whole = moment.replace(microsecond=0)
    return whole + timedelta(seconds=1) if moment.microsecond else whole


def derive_pepper(master_key: bytes) -> bytes:
    return hmac.new(master_key, b"appliance/api-key-pepper/v1", hashlib.sha256).digest()


class ApiKeyService:
    def __init__(self, conn: sqlite3.Connection, pepper: bytes, audit: AuditLog | None = None,
                 roles: Mapping[str, frozenset[str]] | Collection[str] | None = None) -> None:
        """`roles`: each role's permissions (as `Rbac.roles`), or only their names, which then grant what the
        shipped roles file grants them (every permission for a role it lacks)."""
        self.conn = conn
        self.pepper = pepper
        self.audit = audit
        if roles is None:
            roles = Rbac.load().roles
        if isinstance(roles, Mapping):
            self.use_roles(roles)
        else:
            shipped = Rbac.load().roles
            self.use_roles({role: shipped.get(role, frozenset(PERMISSIONS)) for role in roles})

    def use_roles(self, roles: Mapping[str, frozenset[str]]) -> None:
        """What each role grants from now on (the roles file changed while running): new keys' roles and scopes
        are checked against it."""
        self.grants: dict[str, frozenset[str]] = dict(roles)
        self.roles = tuple(self.grants)

    def _digest(self, key: str) -> str:
        return hmac.new(self.pepper, key.encode(), hashlib.sha256).hexdigest()

    def create(self, name: str, role: str, expires_in: timedelta | None = None, *, limits: Limits = UNLIMITED,
               actor: str = "system", owner_user_id: str | None = None,
               narrowed: Restrictions = NONE) -> tuple[ApiKey, str]:
        """Create a key; the secret is returned here once and never stored (nor audited: only the key's id).
        `narrowed`: scopes (each granted by `role`), models and collections; see `appliance.auth.restrictions`."""
        narrowed = restrictions.check_shape(narrowed)
        quotas = {k: v for k, v in msgspec.structs.asdict(limits).items() if v is not None}
        owner = {"owner_user_id": owner_user_id} if owner_user_id else {}
        with audited(self.audit, actor, "key.create", name=name[:80], role=role, **quotas, **owner,
                     **narrowed.details()) as event:
            for limit, value in quotas.items():
                if value <= 0:
                    raise InvalidRequest(f"{limit} must be a positive number of "
                                         f"{'requests' if limit == 'rpm' else 'tokens'}; leave it out for no limit",
                                         param=limit)
            if role not in self.roles:
                raise InvalidRequest(f"unknown role {role!r}; roles: {', '.join(self.roles)}", param="role")
            if not name.strip():
                raise InvalidRequest("a key needs a name", param="name")
            restrictions.check_scopes(narrowed.scopes, role, self.grants)
            key_id = "".join(secrets.choice(ALPHABET) for _ in range(ID_LEN))
            body = key_id + "".join(secrets.choice(ALPHABET) for _ in range(SECRET_LEN))
            secret = PREFIX + body + _checksum(body)
            now = datetime.now(UTC)
            expires = _whole_second_ceiling(now + expires_in).isoformat() if expires_in is not None else None
            event.target, event.details["expires_at"] = key_id, expires
            with event.commit():
                self.conn.execute("INSERT INTO api_keys(id, name, role, digest, created_at, expires_at, rpm, tpm, "
                                  "daily_tokens, owner_user_id, scopes, models, collections) "
                                  "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                  (key_id, name, role, self._digest(secret), now.isoformat(timespec="seconds"),
                                   expires, limits.rpm, limits.tpm, limits.daily_tokens, owner_user_id,
                                   restrictions.encode(narrowed.scopes), restrictions.encode(narrowed.models),
                                   restrictions.encode(narrowed.collections)))
        return self.get(key_id), secret

    def create_for_user(self, user_id: str, user_role: str, name: str, role: str | None = None,
                        expires_in: timedelta | None = None, *, limits: Limits = UNLIMITED,
                        actor: str = "system", narrowed: Restrictions = NONE) -> tuple[ApiKey, str]:
        """A key a user makes for themselves: it carries the user's own role (asking for another is refused)."""
        if role is not None and role != user_role:
            if self.audit is not None:
                self.audit.record_failure(actor, "key.create", "", Forbidden("asked for another role"),
                                          name=name[:80], role=role[:80], owner_user_id=user_id)
            raise Forbidden(f"a key you make for yourself carries your own role {user_role!r}, not {role[:80]!r}; "
                            "leave out role, or ask an admin for a key with another role", param="role",
                            code="role_not_allowed")
        return self.create(name, user_role, expires_in, limits=limits, actor=actor, owner_user_id=user_id,
                           narrowed=narrowed)

    def get(self, key_id: str) -> ApiKey:
        row = self.conn.execute(SELECT_KEYS + " WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise KeyNotFound(f"no API key with id {key_id[:80]!r}", param="id")
        return _key(row)

    def list(self, owner_user_id: str | None = None) -> list[ApiKey]:
        """All keys, or only those the user `owner_user_id` made for themselves."""
        if owner_user_id is None:
            rows = self.conn.execute(SELECT_KEYS + " ORDER BY created_at").fetchall()
        else:
            rows = self.conn.execute(SELECT_KEYS + " WHERE owner_user_id = ? ORDER BY created_at",
                                     (owner_user_id,)).fetchall()
        return [_key(r) for r in rows]

    def _check_owner(self, key_id: str, owner_user_id: str, actor: str) -> None:
        """Another user's key reads as no key at all (404), and the attempt is audited as denied."""
        row = self.conn.execute("SELECT owner_user_id FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is not None and row["owner_user_id"] == owner_user_id:
            return
        if self.audit is not None:
            self.audit.record_failure(actor, "key.revoke", key_id[:80], Forbidden("not a key of the caller's"),
                                      owner_user_id=owner_user_id)
        raise KeyNotFound(f"you have no API key with id {key_id[:80]!r}; GET /api/me/keys lists yours", param="id")

    def revoke(self, key_id: str, *, actor: str = "system", owner_user_id: str | None = None) -> ApiKey:
        """Revoke a key; with `owner_user_id`, only when that user owns it (see `_check_owner`)."""
        if owner_user_id is not None:
            self._check_owner(key_id, owner_user_id, actor)
        with audited(self.audit, actor, "key.revoke", key_id[:80]) as event:
            key = self.get(key_id)
            event.details.update(name=key.name, role=key.role)
            with event.commit():
                changed = self.conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                            (datetime.now(UTC).isoformat(timespec="seconds"), key_id)).rowcount
                if not changed:
                    event.details["already_revoked"] = True
        return self.get(key_id)

    def has_active_admin(self) -> bool:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        row = self.conn.execute("SELECT 1 FROM api_keys k WHERE k.role = 'admin' AND k.revoked_at IS NULL AND "
                                "(k.expires_at IS NULL OR k.expires_at > ?) AND (k.owner_user_id IS NULL OR EXISTS "
                                "(SELECT 1 FROM users u WHERE u.id = k.owner_user_id AND u.role = 'admin' AND "
                                "u.disabled_at IS NULL)) LIMIT 1", (now,)).fetchone()
        return row is not None

    def authenticate(self, authorization: str | None) -> Principal:
        """Check an `Authorization: Bearer ...` header; every failure reads the same to the caller."""
        denied = Unauthenticated("Incorrect or missing API key; send `Authorization: Bearer <key>` with a key "
                                 "from `appliance keys create`")
        if not authorization or not authorization.startswith("Bearer "):
            raise denied
        key = authorization[len("Bearer ") :].strip()
        match = KEY_RE.match(key)
        if match is None or not hmac.compare_digest(match.group(3), _checksum(match.group(1) + match.group(2))):
            raise denied
        row = self.conn.execute("SELECT k.id, k.name, k.role, k.digest, k.expires_at, k.revoked_at, k.last_used_at, "
                                "k.rpm, k.tpm, k.daily_tokens, k.owner_user_id, k.scopes, k.models, k.collections, "
                                "u.role AS owner_role, u.disabled_at AS owner_disabled_at, u.rpm AS owner_rpm, "
                                "u.tpm AS owner_tpm, u.daily_tokens AS owner_daily_tokens FROM api_keys k "
                                "LEFT JOIN users u ON u.id = k.owner_user_id WHERE k.id = ?",
                                (match.group(1),)).fetchone()
        if row is None or not hmac.compare_digest(row["digest"], self._digest(key)) or row["revoked_at"]:
            raise denied
        if row["owner_user_id"] is not None and (row["owner_role"] is None or row["owner_disabled_at"]):
            raise denied  # the owner is disabled (or gone): so are their keys
        now = datetime.now(UTC)
        if row["expires_at"] and datetime.fromisoformat(row["expires_at"]) <= now:
            raise denied
        last = row["last_used_at"]
        if last is None or now - datetime.fromisoformat(last) > LAST_USED_RESOLUTION:
            try:
                self.conn.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?",
                                  (now.isoformat(timespec="seconds"), row["id"]))
            except sqlite3.Error as exc:  # a full disk: the key still works, only its last use is not noted
                log.warning("keys.last_used_not_saved", key_id=row["id"], error=str(exc)[:200])
        limits = _limits(row["rpm"], row["tpm"], row["daily_tokens"])
        owner_limits = _limits(row["owner_rpm"], row["owner_tpm"], row["owner_daily_tokens"])
        role = row["owner_role"] if row["owner_user_id"] is not None else row["role"]  # the owner's role now
        scopes, models, collections = (restrictions.decode(row[c]) for c in ("scopes", "models", "collections"))
        return Principal(row["id"], row["name"], role, limits, row["owner_user_id"], owner_limits,
                         frozenset(scopes) if scopes is not None else None,
                         frozenset(models) if models is not None else None,
                         tuple(collections) if collections is not None else None)


def _limits(rpm: int | None, tpm: int | None, daily_tokens: int | None) -> Limits:
    return UNLIMITED if rpm is None and tpm is None and daily_tokens is None else Limits(rpm, tpm, daily_tokens)
