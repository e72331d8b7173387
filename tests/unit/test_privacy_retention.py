"""Retention and erasure over the core's stores: what goes, what stays verifiable, and no trace left on disk."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.auth.keys import ApiKeyService
from appliance.auth.quotas import Limits, QuotaService
from appliance.auth.rbac import Rbac
from appliance.auth.sessions import SessionService
from appliance.auth.users import UserService
from appliance.config import SessionSettings
from appliance.datadir import DataDir
from appliance.errors import NotFound
from appliance.privacy.controls import PrivacyControls
from appliance.privacy.policy import SHIPPED_PRIVACY
from appliance.privacy.retention import StoreReport, Subject
from tests.privacy_canaries import CANARIES, scan
from tests.unit.conftest import PASSWORD

AGENT = "CanaryBrowser/9.31 (agent-canary-5521)"
CLIENT = "198.51.100.77"


@pytest.fixture
def controls(data: DataDir, conn: sqlite3.Connection, audit: AuditLog) -> PrivacyControls:
    return PrivacyControls.build(conn, audit, data.read_master_key())


def test_audit_details_hold_pseudonyms_not_pii(data: DataDir, controls: PrivacyControls, audit: AuditLog) -> None:
    audit.record("cli:test", "user.login", "", "denied", name=CANARIES["email"], note=f"from {CANARIES['phone']}")
    record = list(audit.export(action="user.login"))[-1]
    assert record["details"]["name"] == controls.privacy.pseudonym("email", CANARIES["email"])
    assert CANARIES["phone"] not in record["details"]["note"]
    assert audit.verify().ok
    audit.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert scan(data.root, [CANARIES["email"], CANARIES["phone"]]) == []


def test_erasure_removes_a_user_everywhere_and_leaves_no_trace(
        data: DataDir, conn: sqlite3.Connection, audit: AuditLog, users: UserService, api_keys: ApiKeyService,
        controls: PrivacyControls) -> None:
    user = users.create("canaryuser", "user", PASSWORD)
    key, _secret = api_keys.create_for_user(user.id, "user", "laptop")
    SessionService(conn, SessionSettings()).create(user, client=CLIENT, user_agent=AGENT)
    quotas = QuotaService(conn)
    quotas.reserve(f"user:{user.id}", Limits(rpm=10), 5)
    quotas.reserve(f"key:{key.id}", Limits(rpm=10), 5)
    counts = controls.retention.erase("canaryuser", actor="cli:test")
    assert counts["accounts"] == 2 and counts["sessions"] == 1 and counts["usage"] == 2
    assert conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM quota_usage").fetchone()[0] == 0
    erased = list(audit.export(action="privacy.erase"))[-1]
    assert erased["target"].startswith("<SUBJECT:") and "canaryuser" not in erased["target"]
    assert audit.verify().ok
    assert scan(data.root, [AGENT, CLIENT, _secret]) == []
    with pytest.raises(NotFound):
        controls.retention.erase("canaryuser", actor="cli:test")


def test_purge_removes_old_data_and_the_audit_chain_still_verifies(
        conn: sqlite3.Connection, audit: AuditLog, controls: PrivacyControls) -> None:
    for i in range(5):
        audit.record("cli:test", "thing.do", str(i))
    QuotaService(conn).reserve("key:old", Limits(rpm=10), 5)
    retention = controls.retention
    retention.now = lambda: datetime.now(UTC) + timedelta(days=500)  # everything is past its age
    due = retention.due()
    assert len(list(audit.export())) == due["audit"]  # a dry run counts and deletes nothing
    counts = retention.purge(actor="cli:test")
    assert counts["audit"] >= 5 and counts["usage"] == 1
    assert counts == due
    result = audit.verify()
    assert result.ok, result.reason
    assert [r["action"] for r in audit.export()] == ["privacy.purge"]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit_log")
    assert retention.next_purge is not None and retention.last_purge is not None


def test_a_young_store_keeps_its_data(conn: sqlite3.Connection, audit: AuditLog, controls: PrivacyControls) -> None:
    audit.record("cli:test", "thing.do", "x")
    assert controls.retention.purge()["audit"] == 0
    assert audit.verify().count >= 1


class ListStore:
    """A store from elsewhere (RAG, cache) as it plugs in."""

    data_class = "cache_entries"

    def __init__(self) -> None:
        self.items: list[tuple[datetime, str]] = [(datetime(2000, 1, 1, tzinfo=UTC), "old"),
                                                  (datetime.now(UTC), "zebra.canary.7731@example.org")]
        self.compacted = 0

    def purge_older_than(self, cutoff: datetime) -> int:
        before = len(self.items)
        self.items = [i for i in self.items if i[0] >= cutoff]
        return before - len(self.items)

    def count_older_than(self, cutoff: datetime) -> int:
        return sum(1 for i in self.items if i[0] < cutoff)

    def erase_subject(self, subject: Subject) -> int:
        before = len(self.items)
        self.items = [i for i in self.items if not any(t in i[1] for t in subject.terms)]
        return before - len(self.items)

    def report(self) -> StoreReport:
        return StoreReport(self.data_class, len(self.items), min((i[0] for i in self.items), default=None))

    def compact(self) -> None:
        self.compacted += 1


class GateStore(ListStore):
    """A store with storage of its own whose purge holds until the test lets it go: the purge is surely running
    while the test looks at the event loop."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.thread: threading.Thread | None = None

    def purge_older_than(self, cutoff: datetime) -> int:
        self.thread = threading.current_thread()
        self.entered.set()
        self.release.wait(timeout=20)  # a bound for a broken build, whose purge would hold the loop itself
        return super().purge_older_than(cutoff)


def test_a_purge_runs_off_the_event_loop_on_a_connection_of_its_own(
        data: DataDir, conn: sqlite3.Connection, audit: AuditLog) -> None:
    controls = PrivacyControls.build(conn, audit, data.read_master_key(), connect=data.connect)
    retention = controls.retention
    gate = GateStore()
    retention.register(gate)
    conn.executemany("INSERT INTO quota_usage(subject, requests, tokens, at, day, day_tokens) "
                     "VALUES (?, 1, 1, 0, '2000-01-01', 1)", [(f"key:{i}",) for i in range(20_000)])
    for i in range(50):
        audit.record("cli:test", "thing.do", str(i))
    retention.now = lambda: datetime.now(UTC) + timedelta(days=500)  # everything is past its age
    seen_during: dict[str, object] = {}

    async def main() -> dict[str, int]:
        purge = asyncio.create_task(retention.purge_apart(actor="cli:test"))
        await asyncio.to_thread(gate.entered.wait, 20)  # the purge is inside the last store now, and held there
        # the loop runs, and the shared connection serves reads and writes (no transaction of the purge holds it)
        seen_during["purge_done"] = purge.done()
        seen_during["usage_left"] = conn.execute("SELECT COUNT(*) FROM quota_usage").fetchone()[0]
        audit.record("cli:test", "during.purge", "x")
        gate.release.set()
        return await purge

    counts = asyncio.run(main())
    assert seen_during == {"purge_done": False, "usage_left": 0}  # the big delete was done, on the other connection
    assert gate.thread is not None and gate.thread is not threading.main_thread()
    assert counts["usage"] == 20_000 and counts["audit"] >= 50 and counts["cache_entries"] == 2
    actions = [r["action"] for r in audit.export()]
    assert actions == ["during.purge", "privacy.purge"], actions  # both logs append to one chain
    result = audit.verify()
    assert result.ok, result.reason


def test_registered_stores_join_purge_erasure_and_report(controls: PrivacyControls) -> None:
    store = ListStore()
    controls.retention.register(store)
    assert controls.retention.due()["cache_entries"] == 1 and len(store.items) == 2  # a dry run deletes nothing
    assert controls.retention.purge()["cache_entries"] == 1
    assert controls.retention.due()["cache_entries"] == 0
    assert controls.retention.erase("Zebra.Canary.7731@example.org", actor="cli:test")["cache_entries"] == 1
    assert store.items == [] and store.compacted == 2
    report = controls.retention.report()
    by_class = {c.data_class: c for c in report.classes}
    assert by_class["cache_entries"].retention == "7d" and by_class["audit"].count >= 1
    assert by_class["conversations"].retention == "not stored"
    with pytest.raises(TypeError):
        controls.retention.register(object())  # type: ignore[arg-type]


def test_purge_leaves_no_trace_of_what_it_deleted(
        data: DataDir, conn: sqlite3.Connection, audit: AuditLog, users: UserService,
        controls: PrivacyControls) -> None:
    user = users.create("olduser", "user", PASSWORD)
    SessionService(conn, SessionSettings()).create(user, client=CLIENT, user_agent=AGENT)
    target = "model-canary-target-4417"
    audit.record("cli:test", "model.pull", target)
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the rows are in the database file too, not only the WAL
    assert scan(data.root, [AGENT, target]) != []
    controls.retention.now = lambda: datetime.now(UTC) + timedelta(days=500)
    counts = controls.retention.purge(actor="cli:test")
    assert counts["sessions"] == 1 and counts["audit"] >= 2
    assert scan(data.root, [AGENT, CLIENT, target]) == []
    assert audit.verify().ok


def test_a_changed_policy_file_is_audited_once(
        data: DataDir, conn: sqlite3.Connection, audit: AuditLog, tmp_path: Path) -> None:
    policy = tmp_path / "privacy.toml"
    policy.write_text(SHIPPED_PRIVACY.read_text())
    first = PrivacyControls.build(conn, audit, data.read_master_key(), str(policy))
    assert first.record_if_changed() and not first.record_if_changed()
    policy.write_text(SHIPPED_PRIVACY.read_text().replace('[surfaces.rag]\ndefault = "allow"',
                                                          '[surfaces.rag]\ndefault = "redact"'))
    second = PrivacyControls.build(conn, audit, data.read_master_key(), str(policy))
    assert second.record_if_changed()
    changes = [r for r in audit.export(action="policy.change") if r["target"] == "privacy"]
    assert len(changes) == 2 and changes[0]["details"]["digest"] != changes[1]["details"]["digest"]


def test_roles_and_privacy_changes_do_not_mask_each_other(data: DataDir, conn: sqlite3.Connection,
                                                          audit: AuditLog) -> None:
    rbac = Rbac.load()
    for _ in range(2):  # two starts of an unchanged box record each policy once
        rbac.record_if_changed(audit)
        PrivacyControls.build(conn, audit, data.read_master_key()).record_if_changed()
    assert [r["target"] for r in audit.export(action="policy.change")] == ["rbac", "privacy"]
