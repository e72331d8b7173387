"""The audit log on a real SQLite database: the chain, every tampering it must catch, the secret guard,
concurrent appenders, export filters, and the records the key and model services write."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import GENESIS_HASH, AuditLog, AuditLogMissing, record_hash
from appliance.auth.keys import ApiKeyService, derive_pepper
from appliance.crypto.keyring import KeyRing
from appliance.datadir import DataDir
from appliance.errors import InvalidRequest, ModelNotFound, RegistryError
from appliance.registry.catalog import Catalog, CatalogEntry
from appliance.registry.service import ModelRegistry
from appliance.registry.store import ModelStore
from tests.unit.ggufs import make_gguf


def fill(audit: AuditLog, n: int = 5) -> list[dict[str, Any]]:
    return [audit.record("cli:tester", "key.create", f"key{i}", name=f"k{i}", role="admin") for i in range(1, n + 1)]


def drop_triggers(conn: sqlite3.Connection) -> None:
    """What someone with write access to the file can do first."""
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("DROP TRIGGER audit_log_no_delete")


def rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute("SELECT * FROM audit_log ORDER BY seq")]


# --- the chain ---------------------------------------------------------------------------------------------------

def test_a_chain_of_records_verifies_and_can_be_rechecked_from_the_export(audit: AuditLog) -> None:
    written = fill(audit)
    result = audit.verify()
    assert result.ok and result.count == 5 and result.first_broken_seq is None and result.reason == ""
    assert result.last_hash == written[-1]["hash"] and result.warnings == ()
    exported = list(audit.export())
    assert [r["seq"] for r in exported] == [1, 2, 3, 4, 5]
    assert exported[0]["prev_hash"] == GENESIS_HASH
    for before, record in itertools.pairwise(exported):
        assert record["prev_hash"] == before["hash"]
    for record in exported:  # an outside checker needs only the documented canonical JSON
        stored_details = json.dumps(record["details"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        fields = {k: v for k, v in {**record, "details": stored_details}.items() if k != "hash"}
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert hashlib.sha256(text.encode()).hexdigest() == record["hash"]
        assert record["at"].endswith("+00:00")
    assert exported[2]["details"] == {"name": "k3", "role": "admin"}


def test_an_empty_log_verifies(audit: AuditLog) -> None:
    assert audit.verify().ok and audit.verify().count == 0


def test_triggers_refuse_update_and_delete(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit, 2)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit_log SET actor = 'someone else' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit_log WHERE seq = 2")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit_log")
    assert audit.verify().count == 2


@pytest.mark.parametrize(("column", "value"), [
    ("at", "2020-01-01T00:00:00.000000+00:00"), ("actor", "cli:innocent"), ("action", "key.list"),
    ("target", "other"), ("outcome", "denied"), ("details", '{"name":"k3","role":"user"}'),
])
def test_an_altered_field_is_named(audit: AuditLog, conn: sqlite3.Connection, column: str, value: str) -> None:
    fill(audit)
    drop_triggers(conn)
    conn.execute(f"UPDATE audit_log SET {column} = ? WHERE seq = 3", (value,))
    result = audit.verify()
    assert not result.ok and result.first_broken_seq == 3 and result.count == 2
    assert result.reason == "record 3: hash does not match its contents (altered)"


def test_an_altered_record_with_a_recomputed_hash_breaks_the_next_link(
    audit: AuditLog, conn: sqlite3.Connection
) -> None:
    fill(audit)
    drop_triggers(conn)
    forged = {**rows(conn)[2], "actor": "cli:innocent"}
    conn.execute("UPDATE audit_log SET actor = ?, hash = ? WHERE seq = 3", (forged["actor"], record_hash(forged)))
    result = audit.verify()
    assert result.first_broken_seq == 4
    assert result.reason.startswith("record 4: prev_hash does not match record 3")


def test_a_value_of_the_wrong_type_is_altered(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit, 3)
    drop_triggers(conn)
    conn.execute("UPDATE audit_log SET target = X'00ff' WHERE seq = 2")
    result = audit.verify()
    assert result.first_broken_seq == 2 and "wrong type" in result.reason


def test_a_removed_middle_record_is_named(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit)
    drop_triggers(conn)
    conn.execute("DELETE FROM audit_log WHERE seq = 3")
    result = audit.verify()
    assert not result.ok and result.first_broken_seq == 3 and result.count == 2
    assert result.reason == "record 3 is missing (removed)"


def test_several_removed_records_are_named(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit, 6)
    drop_triggers(conn)
    conn.execute("DELETE FROM audit_log WHERE seq IN (2, 3, 4)")
    result = audit.verify()
    assert result.first_broken_seq == 2 and result.reason == "records 2 to 4 are missing (removed)"


def test_a_removed_middle_record_with_renumbering_is_named(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit)
    drop_triggers(conn)
    conn.execute("DELETE FROM audit_log WHERE seq = 3")
    conn.execute("UPDATE audit_log SET seq = seq - 1 WHERE seq > 3")
    result = audit.verify()
    assert result.first_broken_seq == 3 and result.reason.startswith("record 3: prev_hash does not match record 2")


def test_removing_the_newest_record_leaves_a_trace(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit)
    drop_triggers(conn)
    conn.execute("DELETE FROM audit_log WHERE seq = 5")
    result = audit.verify()
    assert not result.ok and result.first_broken_seq == 5 and result.count == 4
    assert "record 5 missing from the end" in result.reason


def test_new_records_after_a_truncation_keep_the_gap_visible(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit)
    drop_triggers(conn)
    conn.execute("DELETE FROM audit_log WHERE seq >= 4")
    assert audit.record("cli:tester", "key.revoke", "key1")["seq"] == 6
    result = audit.verify()
    assert result.first_broken_seq == 4 and result.reason == "records 4 to 5 are missing (removed)"


def test_truncation_that_also_rewinds_sqlite_sequence_is_the_documented_limit(
    audit: AuditLog, conn: sqlite3.Connection
) -> None:
    """A chain alone cannot show that its newest records are gone; the last hash kept off the box can."""
    written = fill(audit)
    drop_triggers(conn)
    conn.execute("DELETE FROM audit_log WHERE seq = 5")
    conn.execute("UPDATE sqlite_sequence SET seq = 4 WHERE name = 'audit_log'")
    result = audit.verify()
    assert result.ok and result.count == 4
    assert result.last_hash != written[-1]["hash"]  # what comparing with an off-box anchor catches


def test_swapped_records_are_named(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit)
    drop_triggers(conn)
    second, third = rows(conn)[1:3]
    columns = [c for c in second if c != "seq"]
    for seq, values in ((2, third), (3, second)):
        conn.execute(f"UPDATE audit_log SET {', '.join(f'{c} = ?' for c in columns)} WHERE seq = ?",
                     [*(values[c] for c in columns), seq])
    result = audit.verify()
    assert result.first_broken_seq == 2
    assert result.reason.startswith("record 2: prev_hash does not match record 1 (reordered")


def test_a_forged_record_inserted_in_the_middle_is_named(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit)
    drop_triggers(conn)
    for seq in (5, 4, 3):  # make room at 3, highest first so that no seq collides
        conn.execute("UPDATE audit_log SET seq = seq + 1 WHERE seq = ?", (seq,))
    forged: dict[str, Any] = {"seq": 3, "at": rows(conn)[1]["at"], "actor": "cli:innocent", "action": "key.create",
                              "target": "alibi", "outcome": "ok", "details": "{}", "prev_hash": rows(conn)[1]["hash"]}
    forged["hash"] = record_hash(forged)  # the algorithm is public: the forged record itself checks out
    conn.execute("INSERT INTO audit_log(seq, at, actor, action, target, outcome, details, prev_hash, hash) "
                 "VALUES (:seq, :at, :actor, :action, :target, :outcome, :details, :prev_hash, :hash)", forged)
    result = audit.verify()
    assert not result.ok and result.first_broken_seq == 4
    assert result.reason.startswith("record 4: prev_hash does not match record 3")


def test_dropped_triggers_are_reported_even_when_the_chain_holds(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit, 2)
    drop_triggers(conn)
    result = audit.verify()
    assert result.ok and len(result.warnings) == 1 and "audit_log_no_update" in result.warnings[0]


# --- never a secret or a prompt ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "key", "api_key", "apiKey", "x-api-key", "secret", "client_secret", "password", "password_hash", "passwd",
    "token", "access_token", "prompt", "system_prompt", "messages", "authorization", "Authorization", "cookie",
    "credentials", "pepper",
])
def test_details_named_like_secrets_are_refused(audit: AuditLog, name: str) -> None:
    details: dict[str, Any] = {name: "x"}
    with pytest.raises(ValueError, match="named like a secret"):
        audit.record("cli:tester", "key.create", "k", **details)
    with pytest.raises(ValueError, match="named like a secret"):
        audit.record("cli:tester", "key.create", "k", request={"body": [{name: "x"}]})
    assert audit.verify().count == 0


@pytest.mark.parametrize("name", ["key_id", "prompt_tokens", "token_count", "name", "role", "expires_at", "sha256",
                                  "size_bytes", "source", "reason", "code"])
def test_ordinary_details_are_accepted(audit: AuditLog, name: str) -> None:
    details: dict[str, Any] = {name: 1}
    assert audit.record("cli:tester", "key.create", "k", **details)["details"] == f'{{"{name}":1}}'


def test_a_value_shaped_like_an_api_key_is_refused_without_echoing_it(audit: AuditLog) -> None:
    key = "apl_" + "Ab3" * 15 + "x"
    attempts: list[dict[str, Any]] = [{"target": key}, {"note": f"oops {key}"}, {"names": ["a", key]}]
    for attempt in attempts:
        with pytest.raises(ValueError, match="looks like an API key") as info:
            audit.record("cli:tester", "key.create", **attempt)
        assert key not in str(info.value)
    assert audit.verify().count == 0


def test_bad_records_are_refused(audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="plain JSON"):
        audit.record("cli:tester", "x", when=object())
    with pytest.raises(ValueError, match="outcome"):
        audit.record("cli:tester", "x", outcome="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="actor and an action"):
        audit.record("", "x")
    assert audit.verify().count == 0


def test_a_database_without_the_table_says_what_to_do() -> None:
    with contextlib.closing(sqlite3.connect(":memory:")) as conn, pytest.raises(AuditLogMissing,
                                                                                 match="appliance init"):
        AuditLog(conn)


# --- concurrency -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True], ids=["two-connections", "one-shared-connection"])
def test_concurrent_appenders_keep_the_chain(data: DataDir, shared: bool) -> None:
    per_thread = 40
    with contextlib.closing(data.connect()) as first, contextlib.closing(data.connect()) as second:
        logs = [AuditLog(first), AuditLog(first if shared else second)]
        if shared:
            logs[1] = logs[0]
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def append(log: AuditLog, who: str) -> None:
            try:
                barrier.wait()
                for i in range(per_thread):
                    log.record(who, "model.pull", f"m{i}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=append, args=(log, f"t{n}")) for n, log in enumerate(logs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        result = AuditLog(first).verify()
    assert result.ok and result.count == 2 * per_thread, result.reason


# --- export ------------------------------------------------------------------------------------------------------

def test_export_filters(audit: AuditLog) -> None:
    fill(audit, 3)
    audit.record("cli:other", "model.remove", "m", sha256="ab")
    everything = list(audit.export())
    third_at = everything[2]["at"]
    assert [r["seq"] for r in audit.export(since=third_at)] == [3, 4]
    assert [r["seq"] for r in audit.export(until=third_at)] == [1, 2]
    assert [r["seq"] for r in audit.export(action="model.remove")] == [4]
    assert [r["seq"] for r in audit.export(actor="cli:tester", since="2000-01-01")] == [1, 2, 3]
    assert list(audit.export(since="2999-01-01T00:00:00Z")) == []
    assert len(list(audit.export(since="2000-01-01T01:00:00+01:00", until="2999-12-31"))) == 4
    with pytest.raises(ValueError, match="--since 'yesterday' is not an ISO-8601 time"):
        list(audit.export(since="yesterday"))


def test_export_pages_by_seq_either_way_and_filters_by_outcome_and_action_prefix(audit: AuditLog) -> None:
    fill(audit, 3)
    audit.record("cli:other", "model.remove", "m", "denied", reason="in production")
    audit.record("cli:other", "model.pull", "m", "error", reason="disk full")
    audit.record("cli:other", "models_x.odd", "m")  # `model.*` is a prefix with its dot, not `model` alone
    seqs = [r["seq"] for r in audit.export(newest_first=True)]
    assert seqs == [6, 5, 4, 3, 2, 1]
    assert [r["seq"] for r in audit.export(newest_first=True, limit=2)] == [6, 5]
    assert [r["seq"] for r in audit.export(newest_first=True, before_seq=5, limit=2)] == [4, 3]
    assert [r["seq"] for r in audit.export(after_seq=2, limit=2)] == [3, 4]
    assert [r["seq"] for r in audit.export(after_seq=1, before_seq=4)] == [2, 3]
    assert [r["seq"] for r in audit.export(action="model.*")] == [4, 5]
    assert [r["seq"] for r in audit.export(action="model.*", outcome="error")] == [5]
    assert [r["seq"] for r in audit.export(outcome="denied")] == [4]
    assert [r["seq"] for r in audit.export(action="*", newest_first=True, limit=1)] == [6]
    assert list(audit.export(action="model_%")) == []  # no LIKE: wildcards are plain characters
    assert list(audit.export(action="key.%*")) == []


def test_paging_walks_the_primary_key_not_an_offset(audit: AuditLog, conn: sqlite3.Connection) -> None:
    """Newest first from a cursor is a range search on seq: it reads a page, not the log (10k+ records)."""
    from appliance.audit import SELECT_RECORDS, _filters

    where, params = _filters(None, None, None, None, None, 10_000, None)
    plan = " ".join(str(row[3]) for row in conn.execute(
        f"EXPLAIN QUERY PLAN {SELECT_RECORDS}{where} ORDER BY seq DESC LIMIT 100", params))
    assert "USING INTEGER PRIMARY KEY" in plan and "TEMP B-TREE" not in plan, plan


def test_verify_apart_reads_through_its_own_connection(audit: AuditLog, conn: sqlite3.Connection) -> None:
    fill(audit, 4)
    assert audit.verify_apart() == audit.verify()
    drop_triggers(conn)
    conn.execute("UPDATE audit_log SET target = 'other' WHERE seq = 3")
    result = audit.verify_apart()
    assert (result.ok, result.count, result.first_broken_seq) == (False, 2, 3)
    assert "hash does not match" in result.reason and result.warnings


# --- the services record what they change ------------------------------------------------------------------------

@pytest.fixture
def keys(data: DataDir, conn: sqlite3.Connection, audit: AuditLog) -> ApiKeyService:
    return ApiKeyService(conn, derive_pepper(data.read_master_key()), audit=audit)


def test_key_changes_are_recorded_without_the_secret(
    keys: ApiKeyService, audit: AuditLog, conn: sqlite3.Connection, data: DataDir
) -> None:
    record, secret = keys.create("ci", "admin", actor="cli:alice")
    keys.revoke(record.id, actor="cli:bob")
    keys.revoke(record.id, actor="cli:bob")
    created, revoked, again = list(audit.export())
    assert (created["actor"], created["action"], created["target"], created["outcome"]) == (
        "cli:alice", "key.create", record.id, "ok")
    assert created["details"] == {"name": "ci", "role": "admin", "expires_at": None}
    assert (revoked["actor"], revoked["action"], revoked["target"]) == ("cli:bob", "key.revoke", record.id)
    assert again["details"]["already_revoked"] is True
    secret_part = secret[len("apl_") + 8:-6]
    assert secret_part not in "\n".join(conn.iterdump())
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert secret_part.encode() not in b"".join(p.read_bytes() for p in data.root.glob("appliance.db*"))
    assert audit.verify().ok


def test_refused_key_changes_are_recorded_as_errors(keys: ApiKeyService, audit: AuditLog) -> None:
    with pytest.raises(InvalidRequest):
        keys.create("ci", "wizard", actor="cli:alice")
    with pytest.raises(InvalidRequest):
        keys.revoke("nosuchid", actor="cli:alice")
    bad_role, unknown = list(audit.export())
    assert bad_role["outcome"] == "error" and "unknown role 'wizard'" in bad_role["details"]["reason"]
    assert unknown["outcome"] == "error" and unknown["target"] == "nosuchid"
    assert "no API key" in unknown["details"]["reason"]


def test_a_change_whose_record_is_refused_does_not_happen(keys: ApiKeyService, audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="looks like an API key"):
        keys.create("apl_" + "x" * 46, "admin")
    assert keys.list() == [] and audit.verify().count == 0


def test_services_without_an_audit_log_still_work(data: DataDir, conn: sqlite3.Connection) -> None:
    service = ApiKeyService(conn, derive_pepper(data.read_master_key()))
    record, _ = service.create("ci", "admin")
    service.revoke(record.id)
    assert AuditLog(conn).verify().count == 0


def test_model_changes_and_refusals_are_recorded(
    data: DataDir, conn: sqlite3.Connection, audit: AuditLog, tmp_path: Path
) -> None:
    good = make_gguf(tmp_path / "good.gguf", payload_bytes=256)
    catalog = Catalog(models={"bad": CatalogEntry(source=f"file:{good}", sha256="0" * 64, format="gguf",
                                                  licence="MIT")})
    registry = ModelRegistry(conn, ModelStore(data.models, data.tmp, KeyRing(data.keys)), catalog, audit=audit)
    pulled = registry.pull(f"file:{good}", name="m", actor="cli:alice")
    with pytest.raises(RegistryError, match="expected 0000"):
        registry.pull("bad", actor="cli:alice")
    registry.remove("m", actor="cli:bob")
    with pytest.raises(ModelNotFound):
        registry.remove("m", actor="cli:bob")
    pull, refused, removed, missing = list(audit.export())
    assert (pull["action"], pull["target"], pull["outcome"]) == ("model.pull", "m", "ok")
    assert pull["details"] == {"source": f"file:{good}", "sha256": pulled.sha256, "size_bytes": good.stat().st_size,
                               "format": "gguf", "version": 1, "stage": "production"}
    assert (refused["target"], refused["outcome"], refused["details"]["code"]) == ("bad", "error", "digest_mismatch")
    assert (removed["action"], removed["actor"], removed["details"]["sha256"]) == ("model.remove", "cli:bob",
                                                                                 pulled.sha256)
    assert missing["outcome"] == "error" and missing["details"]["code"] == "model_not_found"
    assert audit.verify().ok
