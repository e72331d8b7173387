"""Versions of the privacy policy changed through the API, kept in the database (`privacy_policies`); the newest
one wins over policies/privacy.toml. Every change is validated first and audited (`policy.change`, target
`privacy`, with the version and the digest of the text)."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime

from appliance.audit import AuditLog, audited
from appliance.privacy.policy import PrivacyPolicy, load_policy, parse_policy


@dataclass(frozen=True)
class PolicyVersion:
    version: int
    created_at: str
    actor: str
    digest: str
    body: str


class PolicyVersions:
    def __init__(self, conn: sqlite3.Connection, audit: AuditLog) -> None:
        self.conn = conn
        self.audit = audit

    def latest(self) -> PolicyVersion | None:
        row = self.conn.execute("SELECT version, created_at, actor, digest, body FROM privacy_policies "
                                "ORDER BY version DESC LIMIT 1").fetchone()
        return PolicyVersion(*row) if row else None

    def history(self) -> list[PolicyVersion]:
        """Every stored version, newest first, without the bodies' text."""
        return [PolicyVersion(r[0], r[1], r[2], r[3], "") for r in self.conn.execute(
            "SELECT version, created_at, actor, digest FROM privacy_policies ORDER BY version DESC")]

    def save(self, text: str, actor: str) -> tuple[PolicyVersion, PrivacyPolicy]:
        """Validate `text` (PolicyError naming the line otherwise), store it as the next version, audit it."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        with audited(self.audit, actor, "policy.change", "privacy", digest=digest) as event:
            policy = parse_policy(text, "policy")
            with event.commit():
                at = datetime.now(UTC).isoformat(timespec="microseconds")
                cursor = self.conn.execute("INSERT INTO privacy_policies(created_at, actor, digest, body) "
                                           "VALUES (?, ?, ?, ?)", (at, actor, digest, text))
                version = int(cursor.lastrowid or 0)
                event.details["version"] = version
        return PolicyVersion(version, at, actor, digest, text), policy

    def active(self, path: str = "") -> tuple[PrivacyPolicy, int | None]:
        """The policy in force: the newest stored version, else the file (`path`, empty: the shipped one)."""
        latest = self.latest()
        if latest is None:
            return load_policy(path), None
        return parse_policy(latest.body, f"privacy policy version {latest.version}"), latest.version
