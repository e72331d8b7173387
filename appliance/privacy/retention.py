"""Retention and erasure over every store that holds data about people.

Each store registers an `ErasableStore` with `Retention.register`: it can delete what is older than a cutoff, delete
everything about one subject, describe what it holds, and compact itself so that deleted bytes leave the disk
(SQLite: secure_delete, VACUUM, WAL checkpoint with TRUNCATE; Chroma: compaction; diskcache: cull + VACUUM). The
stores of the core (this module) are usage (quota counters), sessions, accounts (users and their own keys) and
audit. RAG documents, cache entries and uploads register theirs the same way.

Audit records are append-only and hash-chained; they are kept as the security record. Their details hold no PII in
the clear (the `audit` surface pseudonymizes it on write). Retention removes the oldest records as a whole prefix
and anchors the chain at the last one removed, so `appliance audit verify` still checks everything kept. Erasure
leaves audit records in place (accounts are named there by id and user name) until they age out; the erasure
itself is audited under the subject's pseudonym, never the name or address."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from appliance.audit import AuditLog
from appliance.errors import InvalidRequest, NotFound
from appliance.logs import get_logger
from appliance.privacy.policy import PrivacyPolicy, format_duration
from appliance.usage import hour_start

log = get_logger(__name__)


@dataclass(frozen=True)
class Subject:
    """Whom an erasure is about, resolved from a user name or an email address.

    `principals` are the ids the appliance records usage under (`user:<id>`, `key:<id>`); `terms` are the plain
    values a text store should look for (the user name, the email); `pseudonyms` the same values as the privacy
    policy writes them (`<EMAIL:...>`), for stores that only hold pseudonyms."""

    text: str
    user_id: str | None = None
    user_name: str | None = None
    key_ids: frozenset[str] = frozenset()
    terms: frozenset[str] = frozenset()
    pseudonyms: frozenset[str] = frozenset()

    @property
    def principals(self) -> frozenset[str]:
        ids = {f"key:{k}" for k in self.key_ids}
        return frozenset(ids | ({f"user:{self.user_id}"} if self.user_id else set()))


@dataclass(frozen=True)
class StoreReport:
    """What one store holds: `count` items, the `oldest` one's time (None: empty or undated)."""

    data_class: str
    count: int
    oldest: datetime | None = None
    note: str = ""


@runtime_checkable
class ErasableStore(Protocol):
    """A store of data about people. Methods run on the event loop's thread; keep them short or chunked.

    `data_class` names its retention in the policy (usage, audit, sessions, conversations, rag_documents,
    cache_entries, uploads; another name has no retention and is only erased and reported)."""

    data_class: str

    def purge_older_than(self, cutoff: datetime) -> int:
        """Delete what was stored (or last used) before `cutoff`; return how many items."""
        ...

    def count_older_than(self, cutoff: datetime) -> int:
        """How many items `purge_older_than(cutoff)` would delete, deleting nothing (a dry run)."""
        ...

    def erase_subject(self, subject: Subject) -> int:
        """Delete everything held about `subject`; return how many items."""
        ...

    def report(self) -> StoreReport: ...

    def compact(self) -> None:
        """Make the deletions so far leave no trace in the store's files."""
        ...


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def subject_condition(subject: Subject, text_columns: Sequence[str]) -> tuple[str, list[str]]:
    """An SQL condition (and its parameters) for the rows about `subject` in a table with `owner` and `user_id`
    columns: what they made (as a user or with any of their keys), and rows whose `text_columns` mention their email
    address or its pseudonym (a user name alone is too short a word to search text for). ('', []) when nothing
    can match."""
    clauses, params = [], []
    owners = sorted(subject.principals)
    if owners:
        clauses.append(f"owner IN ({','.join('?' * len(owners))})")
        params += owners
    if subject.user_id:
        clauses.append("user_id = ?")
        params.append(subject.user_id)
    terms = sorted({t.lower() for t in subject.terms if "@" in t} | set(subject.pseudonyms)) if text_columns else []
    for term in terms:
        clauses.append("(" + " OR ".join(f"instr(lower({c}), ?) > 0" for c in text_columns) + ")")
        params += [term.lower()] * len(text_columns)
    return " OR ".join(clauses), params


def compact_sqlite(conn: sqlite3.Connection) -> bool:
    """Deleted rows leave no trace: secure_delete (on for every connection) zeroes them in their pages and in freed
    pages, and a TRUNCATE checkpoint moves the WAL into the database and empties the WAL file, which still held the
    old page images (the tests scan every byte for planted values). VACUUM only gives space back, so it runs only
    when a quarter of the file is free. Returns False when a reader elsewhere kept the checkpoint from completing
    (the next purge completes it)."""
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    if free and free * 4 > int(conn.execute("PRAGMA page_count").fetchone()[0]):
        conn.execute("VACUUM")
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy:
        log.warning("privacy.checkpoint_busy", hint="another connection is reading; the next purge completes it")
    return not busy


class UsageStore:
    """Quota counters (`quota_usage`: per subject, levels and today's tokens) and the usage history
    (`usage_hourly`: requests and tokens per hour, user, key and model); ids and counts, no text."""

    data_class = "usage"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def purge_older_than(self, cutoff: datetime) -> int:
        quotas = self.conn.execute("DELETE FROM quota_usage WHERE at < ?", (cutoff.timestamp(),)).rowcount
        return quotas + self.conn.execute("DELETE FROM usage_hourly WHERE hour < ?", (hour_start(cutoff),)).rowcount

    def count_older_than(self, cutoff: datetime) -> int:
        quotas = self.conn.execute("SELECT COUNT(*) FROM quota_usage WHERE at < ?", (cutoff.timestamp(),))
        history = self.conn.execute("SELECT COUNT(*) FROM usage_hourly WHERE hour < ?", (hour_start(cutoff),))
        return int(quotas.fetchone()[0]) + int(history.fetchone()[0])

    def erase_subject(self, subject: Subject) -> int:
        ids = sorted(subject.principals)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        erased = self.conn.execute(f"DELETE FROM quota_usage WHERE subject IN ({marks})", ids).rowcount  # noqa: S608
        keys = sorted(subject.key_ids)
        return erased + self.conn.execute(
            f"DELETE FROM usage_hourly WHERE user_id = ? OR key_id IN ({','.join('?' * len(keys))})",  # noqa: S608
            [subject.user_id or "\x00", *keys]).rowcount

    def report(self) -> StoreReport:
        count, oldest = self.conn.execute("SELECT COUNT(*), MIN(at) FROM quota_usage").fetchone()
        hours, first_hour = self.conn.execute("SELECT COUNT(*), MIN(hour) FROM usage_hourly").fetchone()
        times = [t for t in (datetime.fromtimestamp(oldest, UTC) if oldest else None, _parse(first_hour)) if t]
        return StoreReport(self.data_class, count + hours, min(times, default=None),
                           note="quota counters and hourly usage per user, key and model")

    def compact(self) -> None:
        compact_sqlite(self.conn)


class SessionStore:
    """Web UI sessions: expired ones and those unused past retention go; a subject's all go."""

    data_class = "sessions"

    def __init__(self, conn: sqlite3.Connection, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.conn = conn
        self.now = now

    def purge_older_than(self, cutoff: datetime) -> int:
        return self.conn.execute("DELETE FROM sessions WHERE last_seen_at < ? OR expires_at < ?",
                                 (_iso(cutoff), _iso(self.now()))).rowcount

    def count_older_than(self, cutoff: datetime) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM sessions WHERE last_seen_at < ? OR expires_at < ?",
                                     (_iso(cutoff), _iso(self.now()))).fetchone()[0])

    def erase_subject(self, subject: Subject) -> int:
        if not subject.user_id:
            return 0
        return self.conn.execute("DELETE FROM sessions WHERE user_id = ?", (subject.user_id,)).rowcount

    def report(self) -> StoreReport:
        count, oldest = self.conn.execute("SELECT COUNT(*), MIN(created_at) FROM sessions").fetchone()
        return StoreReport(self.data_class, count, _parse(oldest))

    def compact(self) -> None:
        compact_sqlite(self.conn)


class AccountStore:
    """Users and the keys they own. Kept while in use (no retention); erasure deletes the user, which deletes their
    own keys and sessions with it (foreign keys), and revokes nothing else."""

    data_class = "accounts"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def purge_older_than(self, cutoff: datetime) -> int:
        return 0

    def count_older_than(self, cutoff: datetime) -> int:
        return 0

    def erase_subject(self, subject: Subject) -> int:
        if not subject.user_id:
            return 0
        keys = self.conn.execute("DELETE FROM api_keys WHERE owner_user_id = ?", (subject.user_id,)).rowcount
        return keys + self.conn.execute("DELETE FROM users WHERE id = ?", (subject.user_id,)).rowcount

    def report(self) -> StoreReport:
        count, oldest = self.conn.execute("SELECT COUNT(*), MIN(created_at) FROM users").fetchone()
        return StoreReport(self.data_class, count, _parse(oldest), note="users; kept while the account exists")

    def compact(self) -> None:
        compact_sqlite(self.conn)


class AuditStore:
    """The audit log: purged by age as a prefix of the chain; erasure keeps it (see the module docstring)."""

    data_class = "audit"

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def purge_older_than(self, cutoff: datetime) -> int:
        return self.audit.purge_before(_iso(cutoff))

    def count_older_than(self, cutoff: datetime) -> int:
        """The whole prefix of the chain up to the last record older than `cutoff`, as `purge_before` deletes."""
        row = self.audit.conn.execute("SELECT COUNT(*) FROM audit_log WHERE seq <= (SELECT MAX(seq) FROM audit_log "
                                      "WHERE at < ?)", (_iso(cutoff),)).fetchone()
        return int(row[0])

    def erase_subject(self, subject: Subject) -> int:
        return 0

    def report(self) -> StoreReport:
        count, oldest = self.audit.conn.execute("SELECT COUNT(*), MIN(at) FROM audit_log").fetchone()
        return StoreReport(self.data_class, count, _parse(oldest),
                           note="append-only; PII pseudonymized on write; kept until its retention")

    def compact(self) -> None:
        compact_sqlite(self.audit.conn)


@dataclass(frozen=True)
class ClassReport:
    data_class: str
    count: int
    oldest: str | None
    retention: str
    note: str = ""


@dataclass(frozen=True)
class PrivacyReport:
    classes: list[ClassReport]
    next_purge: str | None
    last_purge: str | None
    policy_digest: str
    entities: list[str] = field(default_factory=list)


class Retention:
    """The purge job and erasure by subject, over every registered store, audited."""

    def __init__(self, policy: Callable[[], PrivacyPolicy], audit: AuditLog,
                 resolve: Callable[[str], Subject], pseudonym: Callable[[str, str], str],
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 connect: Callable[[], sqlite3.Connection] | None = None) -> None:
        self._policy = policy
        self.audit = audit
        self._connect = connect  # a private connection for the jobs off the event loop (`purge_apart`)
        self._one_job = threading.Lock()  # one purge or erasure at a time
        self._resolve = resolve
        self._pseudonym = pseudonym
        self.now = now
        self.stores: list[ErasableStore] = []
        self.last_purge: datetime | None = None
        self.next_purge: datetime | None = None

    def register(self, store: ErasableStore) -> None:
        """Add a store to purges, erasures and reports (RAG documents, cache entries, uploads ...)."""
        if not isinstance(store, ErasableStore):
            raise TypeError(f"{type(store).__name__} does not implement ErasableStore")
        self.stores.append(store)

    def _aged(self, policy: PrivacyPolicy, now: datetime) -> Iterator[tuple[ErasableStore, datetime]]:
        """Each store whose class has a maximum age, with the cutoff before which its items are past it."""
        for store in self.stores:
            age = policy.retention.get(store.data_class)
            if age is not None:
                yield store, now - age

    def purge(self, actor: str = "supervisor") -> dict[str, int]:
        """Delete what is past its class's maximum age in every store, then compact; audited. Runs on the caller's
        thread and connection (the CLI); the server uses `purge_apart`."""
        with self._one_job:
            return self._purge(self.stores, self.audit, actor)

    async def purge_apart(self, actor: str = "supervisor") -> dict[str, int]:
        """`purge` in a worker thread on a connection of its own: a purge of millions of rows, its VACUUM and its
        checkpoint never hold up the event loop, and the loop's connection stays free for requests."""
        return await asyncio.to_thread(self._apart, lambda stores, audit: self._purge(stores, audit, actor))

    def _purge(self, stores: Sequence[ErasableStore], audit: AuditLog, actor: str) -> dict[str, int]:
        policy, now = self._policy(), self.now()
        counts: dict[str, int] = {}
        for store in stores:
            age = policy.retention.get(store.data_class)
            if age is None:
                continue
            with _transaction_for(store, audit):
                counts[store.data_class] = counts.get(store.data_class, 0) + store.purge_older_than(now - age)
        self._compact(store for store in stores if counts.get(store.data_class))
        self.last_purge = now
        self.next_purge = now + policy.purge_interval
        if any(counts.values()):
            audit.record(actor, "privacy.purge", "", "ok", deleted=counts)
        return counts

    def _apart(self, job: Callable[[Sequence[ErasableStore], AuditLog], dict[str, int]]) -> dict[str, int]:
        """Run `job` (in a worker thread) over the stores rebound to a private connection: a store that holds the
        shared connection or audit log gets a copy holding the private ones; stores with connections of their own
        (the RAG indexes, the cache) are used as they are. Without `connect` (tests), the shared ones."""
        with self._one_job:
            if self._connect is None:
                return job(self.stores, self.audit)
            conn = self._connect()
            try:
                audit = AuditLog(conn)
                audit.scrub = self.audit.scrub
                return job([_rebound(store, {id(self.audit.conn): conn, id(self.audit): audit})
                            for store in self.stores], audit)
            finally:
                conn.close()

    def due(self) -> dict[str, int]:
        """What a purge now would delete, per data class; deletes nothing (a dry run)."""
        counts: dict[str, int] = {}
        for store, cutoff in self._aged(self._policy(), self.now()):
            counts[store.data_class] = counts.get(store.data_class, 0) + store.count_older_than(cutoff)
        return counts

    def resolve(self, text: str) -> Subject:
        return self._resolve(text)

    def erase(self, subject_text: str, actor: str) -> dict[str, int]:
        """Delete everything held about a user (by name) or a person (by email) from every store, then compact.
        The audit record names the subject by pseudonym only. On the caller's thread (the CLI); the server uses
        `erase_apart`."""
        subject = self._resolve(subject_text)
        with self._one_job:
            return self._erase(self.stores, self.audit, subject, subject_text, actor)

    async def erase_apart(self, subject_text: str, actor: str) -> dict[str, int]:
        """`erase` in a worker thread on a connection of its own (the subject is resolved first, on the loop)."""
        subject = self._resolve(subject_text)
        return await asyncio.to_thread(
            self._apart, lambda stores, audit: self._erase(stores, audit, subject, subject_text, actor))

    def _erase(self, stores: Sequence[ErasableStore], audit: AuditLog, subject: Subject, subject_text: str,
               actor: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for store in stores:
            with _transaction_for(store, audit):
                counts[store.data_class] = counts.get(store.data_class, 0) + store.erase_subject(subject)
        self._compact(store for store in stores if counts.get(store.data_class))
        audit.record(actor, "privacy.erase", self._pseudonym("subject", subject_text.strip().lower()), "ok",
                     deleted=counts)
        return counts

    @staticmethod
    def _compact(stores: Iterable[ErasableStore]) -> None:
        for store in stores:
            store.compact()

    def report(self) -> PrivacyReport:
        policy = self._policy()
        classes = []
        for store in self.stores:
            item = store.report()
            classes.append(ClassReport(item.data_class, item.count, _iso(item.oldest) if item.oldest else None,
                                       _retention_text(policy.retention.get(item.data_class),
                                                       item.data_class in policy.retention), item.note))
        if not policy.store_conversations:  # a store of conversations kept from before says so; else "not stored"
            held = [c for c in classes if c.data_class == "conversations" and c.count]
            classes = [c for c in classes if c.data_class != "conversations"] + [
                dataclasses.replace(c, note="no new ones stored (conversations.store = false)") for c in held]
            if not held:
                classes.append(ClassReport("conversations", 0, None, "not stored", "conversations.store = false"))
        return PrivacyReport(classes, _iso(self.next_purge) if self.next_purge else None,
                             _iso(self.last_purge) if self.last_purge else None, policy.digest,
                             list(policy.entities))

    async def run_periodic(self, first_delay: float = 5.0) -> None:
        """The purge job of the supervisor: soon after start, then every `retention.purge_interval`."""
        self.next_purge = self.now() + timedelta(seconds=first_delay)
        await asyncio.sleep(first_delay)
        while True:
            try:
                counts = await self.purge_apart()
                if any(counts.values()):
                    log.info("privacy.purged", deleted=counts)
            except (sqlite3.Error, OSError, ValueError) as exc:
                log.warning("privacy.purge_failed", error=str(exc))
                self.next_purge = self.now() + self._policy().purge_interval
            await asyncio.sleep(self._policy().purge_interval.total_seconds())


def _transaction_for(store: ErasableStore, audit: AuditLog) -> contextlib.AbstractContextManager[None]:
    """One transaction of the appliance's database around a store that lives in it (it holds the connection or the
    audit log); none around a store with a database of its own (RAG, the cache), which would only hold the
    database's write lock, and the requests' writes with it, for as long as that store takes."""
    held = {id(audit), id(audit.conn)}
    if any(id(value) in held for value in vars(store).values()):
        return audit.transaction()
    return contextlib.nullcontext()


def _rebound(store: ErasableStore, replacements: dict[int, object]) -> ErasableStore:
    """A shallow copy of `store` whose attributes that are keys of `replacements` (by identity) are replaced."""
    swapped = {name: replacements[id(value)] for name, value in vars(store).items() if id(value) in replacements}
    if not swapped:
        return store
    clone = copy.copy(store)
    for name, value in swapped.items():
        setattr(clone, name, value)
    return clone


def _retention_text(age: timedelta | None, known: bool) -> str:
    return format_duration(age) if known else "kept while in use"


def subject_resolver(conn: sqlite3.Connection, pseudonym: Callable[[str, str], str]
                     ) -> Callable[[str], Subject]:
    """Resolve `USER_OR_EMAIL`: a user name (its id and own keys), else an email address (plain and pseudonym)."""

    def resolve(text: str) -> Subject:
        value = text.strip()
        if not value:
            raise InvalidRequest("name the subject: a user name or an email address", param="subject")
        row = conn.execute("SELECT id, name FROM users WHERE name = ?", (value,)).fetchone()
        terms = {value}
        pseudonyms: set[str] = set()
        if "@" in value:
            terms.add(value.lower())
            pseudonyms.add(pseudonym("email", value))
        if row is None:
            if "@" not in value:
                raise NotFound(f"no user named {value!r}; give a user name (see `appliance users list`) or an "
                               "email address")
            return Subject(value, terms=frozenset(terms), pseudonyms=frozenset(pseudonyms))
        keys = frozenset(r["id"] for r in conn.execute("SELECT id FROM api_keys WHERE owner_user_id = ?",
                                                       (row["id"],)))
        return Subject(value, row["id"], row["name"], keys, frozenset(terms | {row["name"]}),
                       frozenset(pseudonyms))

    return resolve


def core_stores(conn: sqlite3.Connection, audit: AuditLog) -> Sequence[ErasableStore]:
    """The stores of the core, in erasure order (usage before accounts, whose deletion cascades)."""
    return (UsageStore(conn), SessionStore(conn), AuditStore(audit), AccountStore(conn))
