"""SQLite: one database owned by the supervisor (WAL, foreign keys, secure_delete) and its migrations."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from appliance.storage import StorageFull, is_disk_full

# Append only: a migration, once released, never changes; the next one fixes it.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE models (
        name        TEXT PRIMARY KEY,
        source      TEXT NOT NULL,
        format      TEXT NOT NULL,
        sha256      TEXT NOT NULL,
        size_bytes  INTEGER NOT NULL,
        licence     TEXT NOT NULL DEFAULT '',
        created_at  TEXT NOT NULL
    );
    CREATE TABLE api_keys (
        id           TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        role         TEXT NOT NULL,
        digest       TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        expires_at   TEXT,
        revoked_at   TEXT,
        last_used_at TEXT
    );
    """,
    # 2: the hash-chained audit log (appliance/audit.py). AUTOINCREMENT keeps a high-water mark in
    # sqlite_sequence, so removing the newest records leaves a trace; the triggers make it append-only.
    """
    CREATE TABLE audit_log (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        at         TEXT NOT NULL,
        actor      TEXT NOT NULL,
        action     TEXT NOT NULL,
        target     TEXT NOT NULL DEFAULT '',
        outcome    TEXT NOT NULL CHECK (outcome IN ('ok', 'denied', 'error')),
        details    TEXT NOT NULL,
        prev_hash  TEXT NOT NULL,
        hash       TEXT NOT NULL
    );
    CREATE INDEX audit_log_at ON audit_log(at);
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN
        SELECT RAISE(ABORT, 'audit_log is append-only: records cannot be changed');
    END;
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN
        SELECT RAISE(ABORT, 'audit_log is append-only: records cannot be deleted');
    END;
    """,
    # 3: people who log in to the web UI (appliance/auth/users.py). NOCASE folds ASCII only, which is why user
    # names are ASCII. No row is seeded: there is no default user and no default password.
    """
    CREATE TABLE users (
        id                  TEXT PRIMARY KEY,
        name                TEXT UNIQUE NOT NULL COLLATE NOCASE,
        role                TEXT NOT NULL,
        password_hash       TEXT NOT NULL,
        disabled_at         TEXT,
        created_at          TEXT NOT NULL,
        password_changed_at TEXT NOT NULL
    );
    """,
    # 4: token-aware quotas (appliance/auth/quotas.py). Limits live on the key (NULL is unlimited); usage is kept per
    # subject, 'key:<id>' or 'user:<id>', so that users get quotas without another table: the two minute buckets'
    # levels as of `at` (Unix seconds), and the tokens counted for the UTC date `day`.
    """
    ALTER TABLE api_keys ADD COLUMN rpm INTEGER CHECK (rpm IS NULL OR rpm > 0);
    ALTER TABLE api_keys ADD COLUMN tpm INTEGER CHECK (tpm IS NULL OR tpm > 0);
    ALTER TABLE api_keys ADD COLUMN daily_tokens INTEGER CHECK (daily_tokens IS NULL OR daily_tokens > 0);
    CREATE TABLE quota_usage (
        subject     TEXT PRIMARY KEY,
        requests    REAL NOT NULL,
        tokens      REAL NOT NULL,
        at          REAL NOT NULL,
        day         TEXT NOT NULL,
        day_tokens  INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    # 5: web UI sessions (appliance/auth/sessions.py). `id` is the SHA-256 of the cookie's random token, never the
    # token; the CSRF token is derived from the token, so it is not stored either. Times are ISO-8601 UTC.
    """
    CREATE TABLE sessions (
        id            TEXT PRIMARY KEY,
        user_id       TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        created_at    TEXT NOT NULL,
        last_seen_at  TEXT NOT NULL,
        expires_at    TEXT NOT NULL,
        client        TEXT NOT NULL DEFAULT '',
        user_agent    TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID;
    CREATE INDEX sessions_user ON sessions(user_id);
    CREATE INDEX sessions_expires ON sessions(expires_at);
    """,
    # 6: keys that users make for themselves (`/api/me/keys`): the owner, NULL for keys made by an admin or the CLI.
    # Deleting a user deletes their keys; an owned key acts with its owner's current role (appliance/auth/keys.py).
    """
    ALTER TABLE api_keys ADD COLUMN owner_user_id TEXT NULL REFERENCES users(id) ON DELETE CASCADE;
    CREATE INDEX api_keys_owner ON api_keys(owner_user_id);
    """,
    # 7: what a key may touch, each a JSON array of names (NULL: no narrowing): `scopes` (permissions, within its
    # role), `models` and `collections`; and quota limits per user (NULL is unlimited), spent as 'user:<id>'.
    """
    ALTER TABLE api_keys ADD COLUMN scopes TEXT;
    ALTER TABLE api_keys ADD COLUMN models TEXT;
    ALTER TABLE api_keys ADD COLUMN collections TEXT;
    ALTER TABLE users ADD COLUMN rpm INTEGER CHECK (rpm IS NULL OR rpm > 0);
    ALTER TABLE users ADD COLUMN tpm INTEGER CHECK (tpm IS NULL OR tpm > 0);
    ALTER TABLE users ADD COLUMN daily_tokens INTEGER CHECK (daily_tokens IS NULL OR daily_tokens > 0);
    """,
    # 8: privacy (appliance/privacy/). Versions of the privacy policy changed through the API (the newest wins over
    # policies/privacy.toml). Audit retention: the oldest records may be purged, and only those at or below the
    # anchor, which keeps the seq and hash of the last purged record so that `audit verify` starts the chain there.
    """
    CREATE TABLE privacy_policies (
        version     INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at  TEXT NOT NULL,
        actor       TEXT NOT NULL,
        digest      TEXT NOT NULL,
        body        TEXT NOT NULL
    );
    CREATE TABLE audit_anchor (
        id    INTEGER PRIMARY KEY CHECK (id = 1),
        seq   INTEGER NOT NULL,
        hash  TEXT NOT NULL,
        at    TEXT NOT NULL
    );
    DROP TRIGGER audit_log_no_delete;
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    WHEN OLD.seq > COALESCE((SELECT seq FROM audit_anchor WHERE id = 1), 0)
    BEGIN
        SELECT RAISE(ABORT, 'audit_log is append-only: records cannot be deleted');
    END;
    CREATE TRIGGER audit_anchor_forward BEFORE UPDATE ON audit_anchor
    WHEN NEW.seq < OLD.seq
    BEGIN
        SELECT RAISE(ABORT, 'the audit anchor only moves forward');
    END;
    """,
    # 9: model versions and aliases (appliance/registry/versions.py). `models` keeps one row per name: its
    # production version, which is what a bare name serves. Every model installed before becomes version 1, in
    # production. An alias routes to a model's production version or a pinned one; `weights` (JSON {"1": 90,
    # "2": 10}) splits its traffic between versions for a canary; NULL sends it all to the one target.
    """
    CREATE TABLE model_versions (
        model           TEXT NOT NULL,
        version         INTEGER NOT NULL CHECK (version > 0),
        source          TEXT NOT NULL,
        format          TEXT NOT NULL,
        sha256          TEXT NOT NULL,
        size_bytes      INTEGER NOT NULL,
        licence         TEXT NOT NULL DEFAULT '',
        quantisation    TEXT NOT NULL DEFAULT '',
        context_length  INTEGER NOT NULL DEFAULT 0,
        created_at      TEXT NOT NULL,
        stage           TEXT NOT NULL CHECK (stage IN ('staging', 'production', 'archived')),
        promoted_at     TEXT,
        PRIMARY KEY (model, version)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX model_versions_production ON model_versions(model) WHERE stage = 'production';
    CREATE INDEX model_versions_sha256 ON model_versions(sha256);
    INSERT INTO model_versions(model, version, source, format, sha256, size_bytes, licence, created_at, stage,
                               promoted_at)
        SELECT name, 1, source, format, sha256, size_bytes, licence, created_at, 'production', created_at FROM models;
    CREATE TABLE model_aliases (
        alias       TEXT PRIMARY KEY,
        model       TEXT NOT NULL,
        version     INTEGER,
        weights     TEXT,
        updated_at  TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # 10: usage history (appliance/usage.py): requests and tokens per UTC hour ('2026-12-02T13:00:00Z'), user, API
    # key and model; user_id '' for a key no user owns, key_id '' for a web session. No foreign keys: rows outlive
    # neither retention nor erasure (appliance/privacy/retention.py), and a revoked key's history stays readable.
    """
    CREATE TABLE usage_hourly (
        hour               TEXT NOT NULL,
        user_id            TEXT NOT NULL,
        key_id             TEXT NOT NULL,
        model              TEXT NOT NULL,
        requests           INTEGER NOT NULL,
        prompt_tokens      INTEGER NOT NULL,
        completion_tokens  INTEGER NOT NULL,
        PRIMARY KEY (hour, user_id, key_id, model)
    ) WITHOUT ROWID;
    """,
    # 11: responses stored by the Responses API (appliance/gateway/responses/store.py), only where the privacy
    # policy allows storing conversations: the response object and every input item the model saw, as JSON, with
    # the principal that made it (`key:<id>` or `user:<id>`) and its user ('' for none). Retention purges them with
    # the conversations class; erasure removes a subject's.
    """
    CREATE TABLE responses (
        id          TEXT PRIMARY KEY,
        owner       TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        input       TEXT NOT NULL,
        response    TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX responses_owner ON responses(owner);
    CREATE INDEX responses_user ON responses(user_id);
    CREATE INDEX responses_created ON responses(created_at);
    """,
    # 12: `usage_hourly` gains the version that served (`name@N`, the `x-served-model` header; '' for the hours
    # counted before this migration) in its key.
    """
    CREATE TABLE usage_hourly_served (
        hour               TEXT NOT NULL,
        user_id            TEXT NOT NULL,
        key_id             TEXT NOT NULL,
        model              TEXT NOT NULL,
        served             TEXT NOT NULL,
        requests           INTEGER NOT NULL,
        prompt_tokens      INTEGER NOT NULL,
        completion_tokens  INTEGER NOT NULL,
        PRIMARY KEY (hour, user_id, key_id, model, served)
    ) WITHOUT ROWID;
    INSERT INTO usage_hourly_served SELECT hour, user_id, key_id, model, '', requests, prompt_tokens,
        completion_tokens FROM usage_hourly;
    DROP TABLE usage_hourly;
    ALTER TABLE usage_hourly_served RENAME TO usage_hourly;
    """,
    # 13: the quality loop (appliance/feedback/). `served_responses` remembers, per response id (chatcmpl-...,
    # cmpl-..., resp_...), who got it and which version served it (no content), so that its receiver may rate it;
    # `feedback` holds one rating per response (+1/-1, changed by rating again) with an optional comment as the
    # privacy policy's `conversations` surface rewrote it. Erasure and retention clear a rating's comment and owner
    # and leave the rating, which then says nothing about anyone.
    """
    CREATE TABLE served_responses (
        id          TEXT PRIMARY KEY,
        owner       TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        model       TEXT NOT NULL,
        version     INTEGER NOT NULL,
        created_at  TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX served_responses_created ON served_responses(created_at);
    CREATE INDEX served_responses_owner ON served_responses(owner);
    CREATE TABLE feedback (
        response_id TEXT PRIMARY KEY,
        owner       TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        model       TEXT NOT NULL,
        version     INTEGER NOT NULL,
        rating      INTEGER NOT NULL CHECK (rating IN (1, -1)),
        comment     TEXT NOT NULL DEFAULT '',
        created_at  TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX feedback_version ON feedback(model, version);
    CREATE INDEX feedback_created ON feedback(created_at);
    """,
    # 14: single sign-on (appliance/auth/oidc.py). A user created at their first sign-in through an OpenID Provider
    # is linked to it by (issuer, subject) and has no password (password_hash '!sso', which no password matches);
    # a session started that way keeps the provider's ID token, sent back as id_token_hint when it signs out there.
    """
    ALTER TABLE users ADD COLUMN oidc_issuer TEXT;
    ALTER TABLE users ADD COLUMN oidc_subject TEXT;
    CREATE UNIQUE INDEX users_oidc ON users(oidc_issuer, oidc_subject) WHERE oidc_subject IS NOT NULL;
    ALTER TABLE sessions ADD COLUMN id_token TEXT;
    """,
    # 15: bandit aliases (appliance/registry/bandit.py). An alias's `strategy` is 'static' (its target, or a canary
    # split by `weights`) or 'bandit': Thompson sampling over `targets` (a JSON list of models and `name@N`
    # versions; `model`/`version` then name the first target) with an exploration `floor` (NULL: the setting).
    """
    ALTER TABLE model_aliases ADD COLUMN strategy TEXT NOT NULL DEFAULT 'static'
        CHECK (strategy IN ('static', 'bandit'));
    ALTER TABLE model_aliases ADD COLUMN targets TEXT;
    ALTER TABLE model_aliases ADD COLUMN floor REAL;
    """,
    # 16: RAG ingestion jobs (appliance/rag/jobs.py), so that they outlive a restart: `documents` holds what the job
    # carries (msgpack) until it ends; `actor` is the principal that submitted it (its audit records name it);
    # `attempts` counts its starts. `created` is a UNIX time.
    """
    CREATE TABLE ingestion_jobs (
        id            TEXT PRIMARY KEY,
        owner         TEXT NOT NULL,
        actor         TEXT NOT NULL,
        collection    TEXT NOT NULL,
        collection_id TEXT NOT NULL,
        document_id   TEXT NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
        stage         TEXT NOT NULL,
        done          INTEGER NOT NULL DEFAULT 0,
        total         INTEGER NOT NULL DEFAULT 0,
        error         TEXT,
        documents     BLOB,
        attempts      INTEGER NOT NULL DEFAULT 1,
        created       REAL NOT NULL
    );
    CREATE INDEX ingestion_jobs_state ON ingestion_jobs(state, created);
    """,
)


def _statements(script: str) -> Iterator[str]:
    """Split a script into statements; a `;` inside a trigger body or a string literal does not end one."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                yield pending
            pending = ""
    if pending.strip(" \t\n;"):
        raise ValueError(f"incomplete SQL statement in a migration: {pending.strip()[:80]!r}")


class DatabaseFull(StorageFull, sqlite3.OperationalError):
    """SQLITE_FULL from a `Database`: a `StorageFull` (507) that handlers written for `sqlite3.Error` still catch
    (the usage and quota writes that log and go on)."""


class Database(sqlite3.Connection):
    """A connection whose statements turn a full disk into `DatabaseFull` naming the store (`store`) and its file."""

    store = "the database"

    def _full(self) -> DatabaseFull:
        path = next((row[2] for row in super().execute("PRAGMA database_list") if row[1] == "main"), None)
        return DatabaseFull(self.store, path)

    def _run(self, statement: Callable[..., sqlite3.Cursor], *args: Any) -> sqlite3.Cursor:
        try:
            return statement(*args)
        except sqlite3.Error as exc:
            if is_disk_full(exc):
                raise self._full() from exc
            raise

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return self._run(super().execute, sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
        return self._run(super().executemany, sql, parameters)

    def executescript(self, script: str, /) -> sqlite3.Cursor:
        return self._run(super().executescript, script)


def connect(path: Path, store: str = "the database") -> sqlite3.Connection:
    """Open the database with the pragmas every connection needs; a full disk surfaces as `DatabaseFull(store)`."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0, factory=Database)
    conn.store = store
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database lacks, each in its own transaction; returns the new version."""
    current = schema_version(conn)
    if current > len(MIGRATIONS):
        raise RuntimeError(
            f"the database is at schema version {current} but this appliance knows only {len(MIGRATIONS)}; "
            "upgrade the appliance or restore a matching backup"
        )
    for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return schema_version(conn)
