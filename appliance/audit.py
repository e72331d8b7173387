"""The audit log: append-only records of who changed what, each hash-chained to the one before.

Every record's `hash` is the SHA-256 hex of the canonical JSON (sorted keys, no spaces, UTF-8) of its other
fields: `{"action", "actor", "at", "details", "outcome", "prev_hash", "seq", "target"}`, where `details` is the
stored JSON text and `prev_hash` is the previous record's hash (64 zeros for the first). Anyone can re-check the
chain from an export with a few lines of code.

What `verify()` detects: a record altered (its hash no longer matches), removed from the middle (a gap in
`seq`), reordered or forged in between (a `prev_hash` that does not match its predecessor), and removal of the
newest records by plain SQL (the AUTOINCREMENT high-water mark in `sqlite_sequence` is above the last record).

Limits, by design of any unkeyed chain: someone who can write the database file can delete the newest records
*and* lower `sqlite_sequence`, or rewrite every record after the one they change with fresh hashes; neither is
detectable from the file alone. To catch that, keep the count and last hash that `appliance audit verify` prints
somewhere off the box (or ship `audit export` elsewhere) and compare later. The SQLite triggers stop ordinary
UPDATE and DELETE statements, not an attacker with the file.

Never a secret or a prompt: details keys named like secrets, and any value shaped like an API key, are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from appliance import db
from appliance.errors import ApplianceError
from appliance.logs import get_logger
from appliance.storage import full_disk_is

log = get_logger(__name__)

Outcome = Literal["ok", "denied", "error"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "denied", "error")
GENESIS_HASH = "0" * 64
FIELDS = ("seq", "at", "actor", "action", "target", "outcome", "details", "prev_hash", "hash")
# A details key is refused when it is one of these words or ends with `_<word>` (api_key, system_prompt) ...
SECRET_WORDS = frozenset({"key", "secret", "password", "passwd", "token", "prompt", "messages", "authorization",
                          "cookie", "credential", "credentials", "pepper", "apikey"})
# ... or when it contains one of these anywhere (password_hash, client_secret_id).
SECRET_PARTS = ("password", "passwd", "secret", "authorization", "credential", "api_key", "apikey")
API_KEY_SHAPE = re.compile(r"apl_[A-Za-z0-9]{40,}")
MAX_REASON = 500
AUDIT_STORE = "the audit log"
SELECT_RECORDS = "SELECT seq, at, actor, action, target, outcome, details, prev_hash, hash FROM audit_log"
INSERT_RECORD = ("INSERT INTO audit_log(seq, at, actor, action, target, outcome, details, prev_hash, hash) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


class AuditLogMissing(ApplianceError):
    """The database predates the audit log."""


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    first_broken_seq: int | None = None
    reason: str = ""
    last_hash: str = GENESIS_HASH
    warnings: tuple[str, ...] = ()


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(row: Mapping[str, Any] | sqlite3.Row) -> str:
    """The hash of one record: SHA-256 over the canonical JSON of every field but `hash`."""
    return hashlib.sha256(canonical_json({f: row[f] for f in FIELDS[:-1]}).encode()).hexdigest()


def _is_secret_name(name: str) -> bool:
    normal = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower().replace("-", "_").replace(".", "_")
    words = normal.split("_")
    return normal in SECRET_WORDS or words[-1] in SECRET_WORDS or any(p in normal for p in SECRET_PARTS)


def check_no_secrets(value: object, where: str = "details") -> None:
    """Refuse details that could carry a secret or a prompt; the message never repeats the value."""
    if isinstance(value, Mapping):
        for name, item in value.items():
            if not isinstance(name, str):
                raise ValueError(f"audit {where}: keys must be strings")
            if _is_secret_name(name):
                raise ValueError(f"audit {where}: {name!r} is named like a secret or a prompt; the audit log must "
                                 "never hold one: record an id, a name or a count instead")
            check_no_secrets(item, f"{where}.{name}")
    elif isinstance(value, list | tuple):
        for item in value:
            check_no_secrets(item, where)
    elif isinstance(value, str) and API_KEY_SHAPE.search(value):
        raise ValueError(f"audit {where}: the value looks like an API key; record the key's id instead")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def utc_bound(text: str, option: str) -> str:
    """An ISO-8601 time from a user, in the stored form (UTC, microseconds) so that text order is time order."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{option} {text!r} is not an ISO-8601 time; use e.g. 2025-01-31 or "
                         "2025-01-31T12:00:00Z (a time without a zone is taken as UTC)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class AuditLog:
    """Appends to and checks the `audit_log` table. Safe across threads sharing one connection and across
    processes (the CLI and the server) sharing one database."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._lock = threading.RLock()
        self.scrub: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_log'").fetchone()
        if found is None:
            raise AuditLogMissing("the database has no audit log yet (it predates this version); run "
                                  "`appliance init` (or any appliance command) to upgrade it")
        self._file = next((str(row[2]) for row in conn.execute("PRAGMA database_list") if row[1] == "main"), "")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT: a change and its record land together or not at all. Joins a transaction
        already open on this connection (whoever opened it must have used BEGIN IMMEDIATE)."""
        with self._lock:
            if self.conn.in_transaction:
                yield
                return
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    def record(self, actor: str, action: str, target: str = "", outcome: Outcome = "ok",
               **details: Any) -> dict[str, Any]:
        """Append one record and return it. Refuses (ValueError) anything that could hold a secret or a prompt."""
        if not actor or not action:
            raise ValueError("an audit record needs an actor and an action")
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
        check_no_secrets(details)
        check_no_secrets({"actor": actor, "action": action, "target": target}, "record")
        if self.scrub is not None:  # the privacy policy's `audit` surface: no PII in the clear
            details = self.scrub(details)
        try:
            details_json = canonical_json(details)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"audit details must be plain JSON values (str, int, float, bool, None, lists, "
                             f"dicts): {exc}") from None
        with full_disk_is(AUDIT_STORE, self._file, rename=True), self.transaction():
            last = self.conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
            # Continue above the high-water mark, so that records removed from the end stay a visible gap.
            seq = max(last["seq"] if last else 0, self._high_water()) + 1
            row: dict[str, Any] = {"seq": seq, "at": _now(), "actor": actor, "action": action, "target": target,
                                   "outcome": outcome, "details": details_json,
                                   "prev_hash": last["hash"] if last else self._anchor()[1]}
            row["hash"] = record_hash(row)
            self.conn.execute(INSERT_RECORD, [row[f] for f in FIELDS])
        return row

    def record_failure(self, actor: str, action: str, target: str, exc: BaseException, **details: Any) -> None:
        """Record a refused or failed action; best effort, so that the caller's own error is what surfaces."""
        denied = isinstance(exc, ApplianceError) and exc.status_code in (401, 403)
        reason = exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"
        code = getattr(exc, "code", None)
        extra = {"reason": reason[:MAX_REASON], **({"code": code} if code else {})}
        try:
            self.record(actor, action, target, "denied" if denied else "error", **{**details, **extra})
        except (sqlite3.Error, ValueError) as failure:
            log.warning("audit.record_failed", action=action, error=str(failure))

    def _high_water(self) -> int:
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'").fetchone()
        return int(row["seq"]) if row else 0

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction, so that a record appended meanwhile by another process is not half seen."""
        with self._lock:
            if self.conn.in_transaction:
                yield
                return
            self.conn.execute("BEGIN")
            try:
                yield
            finally:
                self.conn.execute("COMMIT")

    def verify(self) -> VerifyResult:
        """Walk the chain from the first record; stop at the first one that is broken."""
        with self._snapshot():
            high_water = self._high_water()
            rows = self.conn.execute(SELECT_RECORDS + " ORDER BY seq")
            result = _walk(rows, high_water, self._anchor())
        return dataclasses.replace(result, warnings=self._missing_triggers())

    def verify_apart(self) -> VerifyResult:
        """`verify()` on a connection of its own, to run in a thread while the shared connection stays free for
        everyone else (a long chain takes a while); an in-memory database is verified on the shared one."""
        if not self._file:
            return self.verify()
        with contextlib.closing(db.connect(Path(self._file))) as conn:
            return AuditLog(conn).verify()

    def _anchor(self) -> tuple[int, str]:
        """Where the chain starts: after the last record purged by retention (appliance/privacy/retention.py)."""
        with contextlib.suppress(sqlite3.OperationalError):  # a database from before migration 8
            row = self.conn.execute("SELECT seq, hash FROM audit_anchor WHERE id = 1").fetchone()
            if row is not None:
                return int(row["seq"]), str(row["hash"])
        return 0, GENESIS_HASH

    def purge_before(self, cutoff: str) -> int:
        """Delete the records older than `cutoff` (ISO-8601 UTC), oldest first and only as a whole prefix of the
        chain; the anchor keeps the last one's seq and hash, so the rest still verifies. Returns how many."""
        with self.transaction():
            last = self.conn.execute("SELECT seq, hash FROM audit_log WHERE at < ? ORDER BY seq DESC LIMIT 1",
                                     (cutoff,)).fetchone()
            if last is None:
                return 0
            self.conn.execute("INSERT INTO audit_anchor(id, seq, hash, at) VALUES (1, ?, ?, ?) ON CONFLICT(id) DO "
                              "UPDATE SET seq = excluded.seq, hash = excluded.hash, at = excluded.at",
                              (last["seq"], last["hash"], _now()))
            return int(self.conn.execute("DELETE FROM audit_log WHERE seq <= ?", (last["seq"],)).rowcount)

    def _missing_triggers(self) -> tuple[str, ...]:
        names = {r["name"] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'")}
        missing = sorted({"audit_log_no_update", "audit_log_no_delete"} - names)
        if not missing:
            return ()
        return (f"the append-only trigger(s) {', '.join(missing)} are missing: someone changed the database by "
                "hand; restore it from a backup and find out who",)

    def export(self, since: str | None = None, until: str | None = None, action: str | None = None,
               actor: str | None = None, *, outcome: str | None = None, before_seq: int | None = None,
               after_seq: int | None = None, newest_first: bool = False, limit: int | None = None
               ) -> Iterator[dict[str, Any]]:
        """Records oldest first (newest first with `newest_first`), filtered: `since` inclusive, `until` exclusive
        (ISO-8601), exact actor and outcome, exact action or a prefix ending in `*` (`model.*`), and `seq` below
        `before_seq` / above `after_seq` (cursor paging along the primary key, never an OFFSET); at most `limit`."""
        where, params = _filters(since, until, action, actor, outcome, before_seq, after_seq)
        query = f"{SELECT_RECORDS}{where} ORDER BY seq {'DESC' if newest_first else 'ASC'}"  # the values are bound
        if limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        for row in self.conn.execute(query, params):
            record = dict(row)
            with contextlib.suppress(TypeError, ValueError):
                record["details"] = json.loads(record["details"])
            yield record


def _filters(since: str | None, until: str | None, action: str | None, actor: str | None, outcome: str | None,
             before_seq: int | None, after_seq: int | None) -> tuple[str, list[str | int]]:
    """The WHERE clause of an export (fixed column names, bound values)."""
    clauses: list[str] = []
    params: list[str | int] = []
    if action is not None and action.endswith("*"):
        prefix = action[:-1]
        clauses.append("substr(action, 1, ?) = ?")
        params += [len(prefix), prefix]
        action = None
    for column, op, value in (("at", ">=", since and utc_bound(since, "--since")),
                              ("at", "<", until and utc_bound(until, "--until")),
                              ("action", "=", action), ("actor", "=", actor), ("outcome", "=", outcome),
                              ("seq", "<", before_seq), ("seq", ">", after_seq)):
        if value is not None:
            clauses.append(f"{column} {op} ?")
            params.append(value)
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), params


def _walk(rows: Iterable[sqlite3.Row], high_water: int, anchor: tuple[int, str] = (0, GENESIS_HASH)
          ) -> VerifyResult:
    expected_seq, prev_hash, count = anchor[0] + 1, anchor[1], 0

    def broken(seq: int, reason: str) -> VerifyResult:
        return VerifyResult(False, count, seq, reason, prev_hash)

    for row in rows:
        seq = row["seq"]
        if not isinstance(seq, int) or seq < expected_seq:
            return broken(expected_seq, f"record {seq!r}: sequence number out of order (forged or renumbered)")
        if seq > expected_seq:
            gap = f"record {expected_seq}" if seq == expected_seq + 1 else f"records {expected_seq} to {seq - 1}"
            return broken(expected_seq, f"{gap} {'is' if seq == expected_seq + 1 else 'are'} missing (removed)")
        if not all(isinstance(row[f], str) for f in FIELDS[1:]):
            return broken(seq, f"record {seq}: a field holds a value of the wrong type (altered)")
        if row["prev_hash"] != prev_hash:
            if seq == 1:
                return broken(seq, "record 1: prev_hash is not the start of the chain (altered)")
            return broken(seq, f"record {seq}: prev_hash does not match record {seq - 1} (reordered, removed or "
                               f"forged records, or record {seq - 1} rewritten)")
        if record_hash(row) != row["hash"]:
            return broken(seq, f"record {seq}: hash does not match its contents (altered)")
        prev_hash, expected_seq, count = row["hash"], seq + 1, count + 1
    if high_water >= expected_seq:
        gap = f"record {expected_seq}" if high_water == expected_seq else f"records {expected_seq} to {high_water}"
        return broken(expected_seq, f"{gap} missing from the end (removed; the log once reached record {high_water})")
    return VerifyResult(True, count, last_hash=prev_hash)


@dataclass
class AuditEvent:
    """One audited action in progress: the service fills in `target` and `details` as it learns them."""

    log: AuditLog | None
    actor: str
    action: str
    target: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    recorded: bool = False

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        """Make the database change inside this block and record it in the same transaction."""
        if self.log is None:
            yield
            return
        with self.log.transaction():
            yield
            self.log.record(self.actor, self.action, self.target, "ok", **self.details)
        self.recorded = True


@contextlib.contextmanager
def audited(audit: AuditLog | None, actor: str, action: str, target: str = "", **details: Any) -> Iterator[AuditEvent]:
    """Audit one service action: 'ok' when the block ends (inside `event.commit()` when it changed the database),
    'error' or 'denied' with the reason when it raises. A no-op when there is no audit log."""
    event = AuditEvent(audit, actor, action, target, dict(details))
    if audit is None:
        yield event
        return
    try:
        yield event
    except Exception as exc:
        audit.record_failure(actor, action, event.target, exc, **event.details)
        raise
    if not event.recorded:
        audit.record(actor, action, event.target, "ok", **event.details)
