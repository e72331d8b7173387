"""The usage history (appliance/usage.py): hourly rows per user, key and model, read back per hour or day with the
names of users and keys, CSV that a spreadsheet will not run, and its retention and erasure."""

from __future__ import annotations

import csv
import io
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from appliance.auth.keys import ApiKeyService, Principal
from appliance.auth.sessions import SessionPrincipal
from appliance.auth.users import UserService
from appliance.errors import InvalidRequest
from appliance.privacy.retention import Subject, UsageStore
from appliance.usage import COLUMNS, UsageLog, UsageRow, acting, csv_cell, hour_start, parse_time, to_csv
from tests.unit.conftest import PASSWORD

T0 = datetime(2026, 12, 2, 13, 41, 7, tzinfo=UTC)


@pytest.fixture
def acting_as(users: UserService, api_keys: ApiKeyService) -> dict[str, Principal | SessionPrincipal]:
    """Who acts: a user's own key ("own"), a key no user owns ("ci") and that user's web session ("web")."""
    user = users.create("erin", "user", PASSWORD)
    own, _ = api_keys.create_for_user(user.id, "user", "laptop")
    ci, _ = api_keys.create("ci", "user")
    return {"own": Principal(own.id, own.name, "user", owner_user_id=user.id), "ci": Principal(ci.id, ci.name, "user"),
            "web": SessionPrincipal(user.id, "erin", "user", "s", "c")}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_the_acting_user_and_key_of_each_kind_of_principal() -> None:
    assert acting(Principal("k1", "ci", "user")) == ("", "k1")
    assert acting(Principal("k2", "laptop", "user", owner_user_id="u1")) == ("u1", "k2")
    assert acting(SessionPrincipal("u2", "erin", "user", "s", "c")) == ("u2", "")
    assert acting(None) == ("", "")


def test_hours_and_times() -> None:
    assert hour_start(T0) == "2026-12-02T13:00:00Z"
    assert hour_start(datetime(2026, 12, 2, 23, 30, tzinfo=UTC) + timedelta(hours=1)) == "2026-12-03T00:00:00Z"
    assert parse_time("2026-12-02", "since") == datetime(2026, 12, 2, tzinfo=UTC)
    assert parse_time("2026-12-02T14:00:00+01:00", "since") == datetime(2026, 12, 2, 13, tzinfo=UTC)
    assert parse_time(None, "since") is None
    with pytest.raises(InvalidRequest, match="until 'yesterday' is not an ISO-8601 time"):
        parse_time("yesterday", "until")


def test_requests_add_up_per_hour_and_day_with_names(
        conn: sqlite3.Connection, acting_as: dict[str, Principal | SessionPrincipal]) -> None:
    clock = Clock()
    usage = UsageLog(conn, clock)
    usage.record(acting_as["own"], "m", 10, 5)
    usage.record(acting_as["own"], "m", 7, 3)
    usage.record(acting_as["web"], "m", 1, 1)
    clock.now = T0 + timedelta(hours=2)
    usage.record(acting_as["ci"], "m", 4, 0)
    usage.record(acting_as["ci"], "other", 0, 0)  # a cached answer: a request, no tokens
    own, ci = acting_as["own"], acting_as["ci"]
    assert isinstance(own, Principal) and isinstance(ci, Principal)

    hourly = usage.report(bucket="hour")
    assert [(r.bucket, r.user, r.key_name, r.model, r.requests, r.total_tokens) for r in hourly] == [
        ("2026-12-02T13:00:00Z", "erin", "", "m", 1, 2),
        ("2026-12-02T13:00:00Z", "erin", "laptop", "m", 2, 25),
        ("2026-12-02T15:00:00Z", "", "ci", "m", 1, 4),
        ("2026-12-02T15:00:00Z", "", "ci", "other", 1, 0),
    ]
    daily = usage.report()
    assert {(r.bucket, r.key_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in daily} == {
        ("2026-12-02", "", "m", 1, 1, 1), ("2026-12-02", own.key_id, "m", 2, 17, 8),
        ("2026-12-02", ci.key_id, "m", 1, 4, 0), ("2026-12-02", ci.key_id, "other", 1, 0, 0)}
    later = usage.report(since=T0 + timedelta(hours=1), bucket="hour")
    assert {r.bucket for r in later} == {"2026-12-02T15:00:00Z"}
    earlier = usage.report(until=T0 + timedelta(hours=1), bucket="hour")
    assert {r.bucket for r in earlier} == {"2026-12-02T13:00:00Z"}
    assert usage.report(since=T0 + timedelta(days=1)) == []


def test_csv_has_the_columns_and_defuses_formulas() -> None:
    rows = [UsageRow("2026-12-02", "=HYPERLINK(\"http://x\")", "u1", "k1", "+cmd", "-m", 1, 2, 3, 5),
            UsageRow("2026-12-02", "erin", "u2", "", "", "@sum", 4, 5, 6, 11)]
    parsed = list(csv.reader(io.StringIO(to_csv(rows))))
    assert tuple(parsed[0]) == COLUMNS
    assert parsed[1] == ["2026-12-02", "'=HYPERLINK(\"http://x\")", "u1", "k1", "'+cmd", "'-m", "1", "2", "3", "5"]
    assert parsed[2][5] == "'@sum" and parsed[2][1] == "erin"
    assert csv_cell("\tx") == "'\tx" and csv_cell(7) == 7 and csv_cell("a=b") == "a=b"


def test_retention_and_erasure_cover_the_history(
        conn: sqlite3.Connection, acting_as: dict[str, Principal | SessionPrincipal]) -> None:
    clock = Clock()
    usage = UsageLog(conn, clock)
    clock.now = T0 - timedelta(days=100)
    usage.record(acting_as["ci"], "m", 1, 1)
    clock.now = T0
    for who in ("ci", "own", "web"):
        usage.record(acting_as[who], "m", 1, 1)
    own, ci = acting_as["own"], acting_as["ci"]
    assert isinstance(own, Principal) and isinstance(ci, Principal) and own.owner_user_id
    store = UsageStore(conn)
    report = store.report()
    assert report.count == 4 and report.oldest == datetime(2026, 8, 24, 13, tzinfo=UTC)
    cutoff = T0 - timedelta(days=90)
    assert store.count_older_than(cutoff) == 1
    assert store.purge_older_than(cutoff) == 1 and store.count_older_than(cutoff) == 0
    assert store.erase_subject(Subject("erin", own.owner_user_id, "erin", frozenset({own.key_id}))) == 2
    assert [(r.key_id, r.requests) for r in usage.report()] == [(ci.key_id, 1)]
    assert store.erase_subject(Subject("x@example.org")) == 0
