"""Web UI sessions: login with a name and a password, a server-side session behind a random cookie token, CSRF
tokens for state-changing requests, and a backoff on repeated failed logins. No HTTP in here.

The cookie carries a random 256-bit token; the database keeps only its SHA-256 (`sessions.id`), so a copy of the
database opens no session. The CSRF token is an HMAC of the session token under a fixed label: the server derives
it again on each request instead of storing it, and it tells nothing about the session token.

A session ends when it has gone unused for `idle_timeout` or `absolute_timeout` after login, at logout, and at once
when its user is disabled. Its user's role is read on every request, so `users set-role` takes effect at once.
`last_seen_at` is written at most once a minute (LAST_SEEN_RESOLUTION), so a session may end up to a minute before
its idle timeout, never after it.

The login backoff (`LoginThrottle`) is kept in memory, so a restart forgets it: per user name and per client
address, after `login_max_failures` failures within `login_failure_window`, each further attempt must wait 1 s,
then 2, 4 ... (doubling with each further failure, capped at `login_backoff_max`) after the latest failure, and is
refused with 429 and Retry-After meanwhile. A successful login clears the name's failures; an address's failures
only age out, so that logging in to one's own account cannot reset the count of guesses at others'.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec

from appliance.audit import API_KEY_SHAPE, AuditLog, Outcome
from appliance.auth.quotas import UNLIMITED, Limits
from appliance.auth.users import NAME_RE, User, UserService
from appliance.config import SessionSettings
from appliance.errors import ApplianceError, Forbidden, LoginThrottled, NotFound, Unauthenticated
from appliance.logs import get_logger

log = get_logger(__name__)

TOKEN_BYTES = 32
LAST_SEEN_RESOLUTION = timedelta(minutes=1)
USER_AGENT_MAX = 200
CLIENT_MAX = 100
CONCURRENT_VERIFICATIONS = 2  # each Argon2id verification takes ~40 ms of one core and 19 MiB
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CSRF_LABEL = b"appliance/csrf/v1"
_MAX_TRACKED = 10_000  # failure records kept before stale ones are swept
BAD_CREDENTIALS = "incorrect user name or password"


def token_hash(token: str) -> str:
    """What the database stores for a session token."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(token: str) -> str:
    """The CSRF token that goes with a session token (see the module docstring)."""
    digest = hmac.new(token.encode(), _CSRF_LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


class SessionPrincipal(msgspec.Struct, frozen=True):
    """Who a request with a session cookie acts as: the user, with the role they have now.

    Shaped like `appliance.auth.keys.Principal` (name, role, limits, subject, quotas, scopes, models, collections)
    so that the permission guard, the gateway and the quota check treat both alike. A session is never narrower than
    its user's role; its requests spend the user's limits, counted as `user:<id>`."""

    user_id: str
    name: str
    role: str
    session_id: str
    csrf_token: str
    limits: Limits = UNLIMITED
    scopes: None = None
    models: None = None
    collections: None = None

    @property
    def subject(self) -> str:
        return f"user:{self.user_id}"

    @property
    def quotas(self) -> tuple[tuple[str, Limits], ...]:
        return ((self.subject, self.limits),)


@dataclass(frozen=True)
class NewSession:
    """A session just created: the token for the cookie and the CSRF token are here once and never stored."""

    user: User
    token: str
    csrf_token: str
    expires_at: str


class SessionService:
    """Creates, checks and ends sessions in the `sessions` table."""

    def __init__(self, conn: sqlite3.Connection, settings: SessionSettings,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.conn = conn
        self.idle = timedelta(seconds=settings.idle_timeout)
        self.absolute = timedelta(seconds=settings.absolute_timeout)
        self.clock = clock

    def create(self, user: User, client: str = "", user_agent: str = "", id_token: str | None = None) -> NewSession:
        """A new session (a new id at every login, against session fixation); expired sessions are swept.
        `id_token`: the OpenID Provider's ID token when the user signed in there (for signing out there too)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self.clock()
        expires = _iso(now + self.absolute)
        self.conn.execute("DELETE FROM sessions WHERE expires_at <= ? OR last_seen_at <= ?",
                          (_iso(now), _iso(now - self.idle)))
        self.conn.execute("INSERT INTO sessions(id, user_id, created_at, last_seen_at, expires_at, client, "
                          "user_agent, id_token) VALUES (?,?,?,?,?,?,?,?)",
                          (token_hash(token), user.id, _iso(now), _iso(now), expires, client[:CLIENT_MAX],
                           user_agent[:USER_AGENT_MAX], id_token))
        return NewSession(user, token, csrf_token(token), expires)

    def authenticate(self, token: str) -> SessionPrincipal:
        """The principal for a session token; Unauthenticated when it is unknown, timed out or its user disabled."""
        ended = Unauthenticated("your session has ended (logged out, timed out, or the user was disabled); "
                                "log in again", code="session_expired")
        if not token or len(token) > 100:
            raise ended
        session_id = token_hash(token)
        row = self.conn.execute(
            "SELECT s.last_seen_at, s.expires_at, u.id AS user_id, u.name, u.role, u.disabled_at, u.rpm, u.tpm, "
            "u.daily_tokens "
            "FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = ?", (session_id,)).fetchone()
        if row is None:
            raise ended
        now = self.clock()
        last_seen = datetime.fromisoformat(row["last_seen_at"])
        if (row["disabled_at"] is not None or datetime.fromisoformat(row["expires_at"]) <= now
                or last_seen + self.idle <= now):
            self.conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            raise ended
        if now - last_seen >= LAST_SEEN_RESOLUTION:
            try:
                self.conn.execute("UPDATE sessions SET last_seen_at = ? WHERE id = ?", (_iso(now), session_id))
            except sqlite3.Error as exc:  # a full disk: the session goes on, its idle clock is not moved
                log.warning("sessions.last_seen_not_saved", error=str(exc)[:200])
        limits = Limits(row["rpm"], row["tpm"], row["daily_tokens"])
        return SessionPrincipal(row["user_id"], row["name"], row["role"], session_id, csrf_token(token),
                                UNLIMITED if limits.unlimited else limits)

    def end(self, session_id: str) -> bool:
        """End one session by its id (the token's hash); False when there was none."""
        return bool(self.conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount)

    def id_token(self, session_id: str) -> str | None:
        """The OpenID Provider's ID token of a session started there; None for a password sign-in."""
        row = self.conn.execute("SELECT id_token FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return row["id_token"] if row is not None else None


def check_csrf(principal: SessionPrincipal, header: str | None) -> None:
    """Refuse a state-changing request made with a session cookie unless it carries the session's CSRF token."""
    if not header or not hmac.compare_digest(principal.csrf_token.encode(), header.strip().encode()):
        raise Forbidden("this request was made with a session cookie but without the session's CSRF token; send "
                        "the csrf_token from the login response in the X-CSRF-Token header", code="csrf_failed")


class LoginThrottle:
    """Failed logins per key (a user name or a client address), in memory; see the module docstring."""

    def __init__(self, settings: SessionSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = settings.login_max_failures
        self.window = settings.login_failure_window
        self.cap = settings.login_backoff_max
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def delay(self, failures: int) -> float:
        """How long to wait after the latest of `failures` recent failures: 0 below the limit, then 1, 2, 4 ..."""
        if failures < self.max_failures:
            return 0.0
        return float(min(self.cap, 2.0 ** min(failures - self.max_failures, 64)))

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def retry_after(self, *keys: str) -> float:
        """Seconds until another attempt for these keys is allowed; 0 when it is allowed now."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                if times:
                    wait = max(wait, times[-1] + self.delay(len(times)) - now)
        return wait

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) >= _MAX_TRACKED:
                for stale in [k for k, v in self._failures.items() if not v or v[-1] <= now - self.window]:
                    del self._failures[stale]
            for key in keys:
                times = self._recent(key, now)
                times.append(now)
                self._failures[key] = times

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


def _loggable_name(name: str) -> str:
    """The attempted name as the audit log may hold it: only when it is well-formed (a password typed into the
    name field must not end up in the log; the caller also drops names that are not users)."""
    return name if NAME_RE.fullmatch(name) and not API_KEY_SHAPE.search(name) else ""


class LoginService:
    """`login` and `logout` for the web UI: password check (off the event loop, at most two at once), backoff,
    session creation, and a `user.login` / `user.logout` audit record with the client address."""

    def __init__(self, users: UserService, sessions: SessionService, throttle: LoginThrottle,
                 audit: AuditLog | None = None, passwords_refused: str | None = None) -> None:
        """`passwords_refused`: why password sign-in is turned off (`[oidc] local_passwords = false`), else None."""
        self.users = users
        self.sessions = sessions
        self.throttle = throttle
        self.audit = audit
        self.passwords_refused = passwords_refused
        self._verifying = asyncio.Semaphore(CONCURRENT_VERIFICATIONS)

    def _record(self, outcome: Outcome, name: str, client: str, target: str = "", **details: object) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record(f"web:{client[:CLIENT_MAX] or 'unknown'}", "user.login", target, outcome,
                              name=name, client=client[:CLIENT_MAX], **details)
        except (sqlite3.Error, ValueError) as exc:
            log.warning("audit.record_failed", action="user.login", error=str(exc))

    def _known_name(self, name: str) -> tuple[str, str]:
        """(name, user id) for the audit record when `name` is a user, else ('', '')."""
        if not _loggable_name(name):
            return "", ""
        try:
            user = self.users.get(name)
        except NotFound:
            return "", ""
        return user.name, user.id

    async def login(self, name: str, password: str, client: str, user_agent: str) -> NewSession:
        if self.passwords_refused is not None:
            logged, user_id = self._known_name(name)
            self._record("denied", logged, client, user_id, reason="password sign-in is turned off")
            raise Forbidden(self.passwords_refused, code="password_login_disabled")
        keys = (f"name:{name.casefold()[:80]}", f"addr:{client}")
        wait = self.throttle.retry_after(*keys)
        if wait > 0:
            logged, user_id = self._known_name(name)
            self._record("denied", logged, client, user_id, reason="too many failed logins")
            raise LoginThrottled(f"too many failed logins; wait {max(1, round(wait))} s before trying again",
                                 retry_after=wait)
        async with self._verifying:
            user = await asyncio.to_thread(self.users.verify_password, name, password)
        if user is None:
            self.throttle.failed(*keys)
            logged, user_id = self._known_name(name)
            self._record("denied", logged, client, user_id, reason=BAD_CREDENTIALS)
            raise Unauthenticated(f"{BAD_CREDENTIALS}; check both and try again, or ask an admin",
                                  code="invalid_credentials")
        self.throttle.succeeded(keys[0])
        try:
            session = self.sessions.create(user, client, user_agent)
        except (sqlite3.Error, ApplianceError):
            self._record("error", user.name, client, user.id, reason="the session could not be stored")
            raise
        self._record("ok", user.name, client, user.id)
        log.info("user.login", user_id=user.id, client=client[:CLIENT_MAX])
        return session

    def start_linked(self, user: User, client: str, user_agent: str, id_token: str, method: str) -> NewSession:
        """A session for a user whom an identity provider vouched for (`method`, e.g. 'oidc'); the same kind of
        session and `user.login` record as a password login. A disabled user is refused."""
        if user.disabled:
            self._record("denied", user.name, client, user.id, reason="the user is disabled", method=method)
            raise Forbidden(f"the user '{user.name}' is disabled on this appliance; ask an admin to enable it",
                            code="user_disabled")
        try:
            session = self.sessions.create(user, client, user_agent, id_token=id_token)
        except (sqlite3.Error, ApplianceError):
            self._record("error", user.name, client, user.id, reason="the session could not be stored", method=method)
            raise
        self._record("ok", user.name, client, user.id, method=method)
        log.info("user.login", user_id=user.id, client=client[:CLIENT_MAX], method=method)
        return session

    def record_refusal(self, reason: str, client: str, name: str = "", user_id: str = "", **details: object) -> None:
        """A `user.login` record for a sign-in refused before any user was known to have signed in."""
        self._record("denied", name, client, user_id, reason=reason, **details)

    def logout(self, principal: SessionPrincipal, client: str) -> str | None:
        """End the session; the provider's ID token when it was started there (to sign out there too)."""
        id_token = self.sessions.id_token(principal.session_id)
        self.sessions.end(principal.session_id)
        if self.audit is not None:
            try:
                self.audit.record(f"user:{principal.name}", "user.logout", principal.user_id, "ok",
                                  client=client[:CLIENT_MAX])
            except (sqlite3.Error, ValueError) as exc:
                log.warning("audit.record_failed", action="user.logout", error=str(exc))
        return id_token
