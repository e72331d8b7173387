"""Web UI sessions against a real SQLite database with a controllable clock: creation, lookup, idle and absolute
expiry, the token stored only as a hash, CSRF, the login backoff's arithmetic, and login's audit records."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from appliance.audit import AuditLog
from appliance.auth.passwords import Argon2Params, derive_password_pepper
from appliance.auth.sessions import (
    LoginService,
    LoginThrottle,
    NewSession,
    SessionPrincipal,
    SessionService,
    check_csrf,
    csrf_token,
    token_hash,
)
from appliance.auth.users import User, UserService
from appliance.config import SessionSettings
from appliance.datadir import DataDir
from appliance.errors import Forbidden, LoginThrottled, Unauthenticated

CHEAP = Argon2Params(memory_kib=64, iterations=1)
PASSWORD = "correct horse battery staple"
SETTINGS = SessionSettings(idle_timeout=1800, absolute_timeout=43200, login_max_failures=5,
                           login_failure_window=900, login_backoff_max=900)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        self.seconds = 1000.0

    def __call__(self) -> datetime:
        return self.now

    def mono(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.seconds += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def users(conn: sqlite3.Connection, audit: AuditLog, data: DataDir) -> UserService:
    return UserService(conn, derive_password_pepper(data.read_master_key()), audit=audit,
                       roles=("admin", "user", "auditor"), params=CHEAP)


@pytest.fixture
def alice(users: UserService) -> User:
    return users.create("alice", "user", PASSWORD)


@pytest.fixture
def sessions(conn: sqlite3.Connection, clock: Clock) -> SessionService:
    return SessionService(conn, SETTINGS, clock=clock)


def test_a_session_is_found_by_its_token_which_is_stored_only_hashed(sessions: SessionService, alice: User,
                                                                      conn: sqlite3.Connection) -> None:
    new = sessions.create(alice, "127.0.0.1", "Mozilla/5.0 " + "x" * 500)
    principal = sessions.authenticate(new.token)
    assert (principal.name, principal.role, principal.user_id) == ("alice", "user", alice.id)
    assert principal.subject == f"user:{alice.id}" and principal.limits.unlimited
    assert principal.csrf_token == new.csrf_token == csrf_token(new.token) != new.token
    [row] = conn.execute("SELECT * FROM sessions").fetchall()
    assert row["id"] == token_hash(new.token) == principal.session_id
    assert new.token not in json.dumps(dict(row)) and new.csrf_token not in json.dumps(dict(row))
    assert row["client"] == "127.0.0.1" and len(row["user_agent"]) == 200
    assert sessions.create(alice).token != new.token  # a new id at every login


@pytest.mark.parametrize("token", ["", "nope", "x" * 1000])
def test_unknown_tokens_are_refused(sessions: SessionService, alice: User, token: str) -> None:
    sessions.create(alice)
    with pytest.raises(Unauthenticated):
        sessions.authenticate(token)


def test_idle_timeout_and_activity_that_keeps_a_session_alive(sessions: SessionService, alice: User,
                                                              clock: Clock) -> None:
    new = sessions.create(alice)
    for _ in range(5):  # used every 20 minutes: stays alive past the 30-minute idle timeout
        clock.advance(20 * 60)
        sessions.authenticate(new.token)
    clock.advance(30 * 60)
    with pytest.raises(Unauthenticated) as refused:
        sessions.authenticate(new.token)
    assert refused.value.code == "session_expired"


def test_absolute_timeout_ends_even_a_busy_session(sessions: SessionService, alice: User, clock: Clock,
                                                   conn: sqlite3.Connection) -> None:
    new = sessions.create(alice)
    for _ in range(12 * 4 - 1):
        clock.advance(15 * 60)
        sessions.authenticate(new.token)
    clock.advance(15 * 60)  # exactly 12 hours after login
    with pytest.raises(Unauthenticated):
        sessions.authenticate(new.token)
    assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0


def test_last_seen_is_written_at_most_once_a_minute(sessions: SessionService, alice: User, clock: Clock,
                                                    conn: sqlite3.Connection) -> None:
    new = sessions.create(alice)
    first = conn.execute("SELECT last_seen_at FROM sessions").fetchone()[0]
    clock.advance(30)
    sessions.authenticate(new.token)
    assert conn.execute("SELECT last_seen_at FROM sessions").fetchone()[0] == first
    clock.advance(31)
    sessions.authenticate(new.token)
    assert conn.execute("SELECT last_seen_at FROM sessions").fetchone()[0] != first


def test_disable_and_role_changes_apply_to_existing_sessions(sessions: SessionService, users: UserService,
                                                             alice: User) -> None:
    new = sessions.create(alice)
    users.set_role("alice", "auditor")
    assert sessions.authenticate(new.token).role == "auditor"
    users.disable("alice")
    with pytest.raises(Unauthenticated):
        sessions.authenticate(new.token)
    users.enable("alice")
    with pytest.raises(Unauthenticated):  # the session was ended, not just suspended
        sessions.authenticate(new.token)


def test_logout_ends_the_session(sessions: SessionService, alice: User) -> None:
    new = sessions.create(alice)
    other = sessions.create(alice)
    assert sessions.end(token_hash(new.token)) and not sessions.end(token_hash(new.token))
    with pytest.raises(Unauthenticated):
        sessions.authenticate(new.token)
    assert sessions.authenticate(other.token).name == "alice"


def test_csrf_needs_the_sessions_own_token(sessions: SessionService, alice: User) -> None:
    principal = sessions.authenticate(sessions.create(alice).token)
    other: SessionPrincipal = sessions.authenticate(sessions.create(alice).token)
    check_csrf(principal, principal.csrf_token)
    for header in (None, "", "x", other.csrf_token, principal.session_id):
        with pytest.raises(Forbidden) as refused:
            check_csrf(principal, header)
        assert refused.value.code == "csrf_failed"


def test_backoff_doubles_after_the_allowed_failures_and_is_capped(clock: Clock) -> None:
    throttle = LoginThrottle(SETTINGS, clock=clock.mono)
    assert [throttle.delay(n) for n in range(4, 10)] == [0, 1, 2, 4, 8, 16]
    assert throttle.delay(40) == 900
    for _ in range(4):
        throttle.failed("name:alice", "addr:1.2.3.4")
    assert throttle.retry_after("name:alice", "addr:1.2.3.4") == 0
    throttle.failed("name:alice", "addr:1.2.3.4")
    assert throttle.retry_after("name:alice") == 1 and throttle.retry_after("addr:1.2.3.4") == 1
    assert throttle.retry_after("name:bob", "addr:5.6.7.8") == 0
    clock.advance(1)
    assert throttle.retry_after("name:alice") == 0
    throttle.failed("name:alice")
    assert throttle.retry_after("name:alice") == 2
    clock.advance(900)  # the failures age out of the window
    assert throttle.retry_after("name:alice", "addr:1.2.3.4") == 0
    for _ in range(6):
        throttle.failed("name:alice")
    throttle.succeeded("name:alice")
    assert throttle.retry_after("name:alice") == 0


def test_login_audits_outcomes_throttles_and_never_records_the_password(
        users: UserService, sessions: SessionService, alice: User, audit: AuditLog, clock: Clock) -> None:
    logins = LoginService(users, sessions, LoginThrottle(SETTINGS, clock=clock.mono), audit=audit)

    async def attempt(name: str, password: str) -> object:
        try:
            return await logins.login(name, password, "10.0.0.7", "test")
        except (Unauthenticated, LoginThrottled) as exc:
            return exc

    async def run() -> list[object]:
        results = [await attempt("alice", "wrong password number " + str(i)) for i in range(3)]
        results.append(await attempt("nobody", PASSWORD))
        results.append(await attempt(PASSWORD, PASSWORD))  # a password typed into the name field
        results.append(await attempt("alice", PASSWORD))  # the address is at its limit now
        clock.advance(1)
        results.append(await attempt("alice", PASSWORD))
        return results

    results = asyncio.run(run())
    wrong, unknown = results[0], results[3]
    assert isinstance(wrong, Unauthenticated) and isinstance(unknown, Unauthenticated)
    assert wrong.to_body() == unknown.to_body()
    assert isinstance(results[5], LoginThrottled) and results[5].retry_after == 1
    new = results[6]
    assert isinstance(new, NewSession) and sessions.authenticate(new.token).name == "alice"

    records = [r for r in audit.export(action="user.login")]
    assert [r["outcome"] for r in records] == ["denied"] * 6 + ["ok"]
    assert {r["details"]["client"] for r in records} == {"10.0.0.7"}
    assert records[0]["details"]["name"] == "alice" and records[3]["details"]["name"] == ""
    exported = json.dumps(list(audit.export()))
    assert PASSWORD not in exported and "wrong password" not in exported and new.token not in exported


def test_over_tls_the_cookie_is_host_prefixed_and_secure(data: DataDir) -> None:
    """The app itself, without its lifespan (no model): login over https, then the cookie authenticates."""
    from litestar.testing import TestClient

    from appliance.app import create_app
    from appliance.config import load_settings

    with contextlib.closing(data.connect()) as conn:
        UserService(conn, derive_password_pepper(data.read_master_key()), roles=("user",)).create(
            "erin", "user", PASSWORD)
    app = create_app(load_settings(env={}, data_dir=data.root).settings)
    client = TestClient(app, base_url="https://127.0.0.1")
    response = client.post("/api/auth/login", json={"username": "erin", "password": PASSWORD})
    assert response.status_code == 200, response.text
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("__Host-appliance_session=")
    assert {"secure", "httponly", "path=/", "samesite=strict"} <= {p.strip().lower() for p in cookie.split(";")}
    token = response.cookies["__Host-appliance_session"]
    me = client.get("/api/me", headers={"Cookie": f"__Host-appliance_session={token}"})
    assert me.status_code == 200 and me.json()["via"] == "session"
    plain = client.get("/api/me", headers={"Cookie": f"appliance_session={token}"})  # the name over http
    assert plain.status_code == 401
    app.state.services.conn.close()
