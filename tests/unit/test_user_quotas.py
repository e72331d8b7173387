"""Quota limits per user: set at creation, changed and cleared (audited as user.update), carried by the user's
session and by every key the user owns, and spent on both the key and its owner, all or nothing."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest

from appliance.audit import AuditLog
from appliance.auth.keys import ApiKeyService
from appliance.auth.quotas import UNLIMITED, Limits, QuotaService, QuotaStatus, Window, merge_status
from appliance.auth.sessions import SessionService
from appliance.auth.users import UserService
from appliance.cli import KEEP, build_parser
from appliance.config import SessionSettings
from appliance.errors import InvalidRequest, RateLimited
from tests.unit.conftest import PASSWORD

NOON = datetime(2026, 11, 23, 12, tzinfo=UTC).timestamp()


@pytest.fixture
def quotas(conn: sqlite3.Connection) -> QuotaService:
    return QuotaService(conn, clock=lambda: NOON)


def test_limits_are_set_at_creation_changed_cleared_and_audited(users: UserService, audit: AuditLog) -> None:
    alice = users.create("alice", "user", PASSWORD, limits=Limits(rpm=10, daily_tokens=5000))
    assert alice.limits == Limits(rpm=10, daily_tokens=5000)
    changed = users.set_limits("alice", {"rpm": None, "tpm": 300}, actor="cli:root")
    assert changed.limits == Limits(tpm=300, daily_tokens=5000)
    assert users.update("alice", limits={"daily_tokens": None}).limits == Limits(tpm=300)
    records = list(audit.export(action="user.update"))
    assert [r["outcome"] for r in records] == ["ok", "ok"]
    assert records[0]["target"] == alice.id and records[0]["details"]["tpm"] == 300
    assert records[0]["details"]["rpm"] is None and records[0]["details"]["previous"]["rpm"] == 10
    for bad in ({"rpm": 0}, {"tpm": -1}, {"burst": 3}):
        with pytest.raises(InvalidRequest):
            users.set_limits("alice", bad)
    assert users.get("alice").limits == Limits(tpm=300)


def test_a_bad_limit_leaves_the_role_unchanged(users: UserService) -> None:
    users.create("alice", "user", PASSWORD)
    with pytest.raises(InvalidRequest, match="rpm"):
        users.update("alice", role="operator", limits={"rpm": 0})
    assert users.get("alice").role == "user"


def test_sessions_and_owned_keys_carry_the_users_limits(users: UserService, api_keys: ApiKeyService,
                                                        conn: sqlite3.Connection) -> None:
    alice = users.create("alice", "user", PASSWORD, limits=Limits(rpm=1))
    settings = SessionSettings(idle_timeout=1800, absolute_timeout=43200, login_max_failures=5,
                               login_failure_window=900, login_backoff_max=60)
    sessions = SessionService(conn, settings)
    session = sessions.authenticate(sessions.create(alice).token)
    assert session.quotas == ((f"user:{alice.id}", Limits(rpm=1)),) and session.scopes is None

    key, secret = api_keys.create_for_user(alice.id, alice.role, "laptop", limits=Limits(tpm=100))
    principal = api_keys.authenticate(f"Bearer {secret}")
    assert principal.quotas == ((f"key:{key.id}", Limits(tpm=100)), (f"user:{alice.id}", Limits(rpm=1)))
    unowned, secret = api_keys.create("ci", "user")
    assert api_keys.authenticate(f"Bearer {secret}").quotas == ((f"key:{unowned.id}", UNLIMITED),)


def test_reserve_all_takes_from_every_subject_or_from_none(quotas: QuotaService) -> None:
    key, user = ("key:k1", Limits(rpm=5)), ("user:u1", Limits(rpm=1))
    taken = quotas.reserve_all([key, user], 10)
    assert [r.subject for r in taken] == ["key:k1", "user:u1"]
    with pytest.raises(RateLimited, match="your user's limit of 1 requests per minute"):
        quotas.reserve_all([key, user], 10)
    requests = quotas.status(*key).requests
    assert requests is not None and requests.remaining == 4  # the refusal gave the key's request back
    assert quotas.reserve_all([("key:free", UNLIMITED)], 10) == []


def test_merged_status_shows_the_tightest_limit() -> None:
    loose = QuotaStatus(requests=Window(10, 9, 6.0), day=Window(1000, 900, 10.0))
    tight = QuotaStatus(requests=Window(2, 1, 30.0))
    merged = merge_status([loose, tight])
    assert merged.requests == Window(2, 1, 30.0) and merged.day == Window(1000, 900, 10.0) and merged.tokens is None


def test_cli_set_limits_takes_numbers_or_none() -> None:
    args = build_parser().parse_args(["users", "set-limits", "alice", "--rpm", "5", "--daily-tokens", "none"])
    assert (args.rpm, args.tpm, args.daily_tokens) == (5, KEEP, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["users", "set-limits", "alice", "--tpm", "0"])
