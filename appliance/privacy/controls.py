"""`PrivacyControls`: the privacy policy in force, its versions, the retention job and erasure, built once per app
(or per CLI command) from the data dir. This is what `Services.privacy` is; see appliance/privacy/__init__.py."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from appliance.audit import AuditLog
from appliance.privacy.actions import derive_pseudonym_key
from appliance.privacy.gateway import GatewayPrivacy
from appliance.privacy.policy import PrivacyPolicy
from appliance.privacy.retention import Retention, core_stores, subject_resolver
from appliance.privacy.service import Privacy
from appliance.privacy.versions import PolicyVersion, PolicyVersions


@dataclass
class PrivacyControls:
    privacy: Privacy
    versions: PolicyVersions
    retention: Retention
    gateway: GatewayPrivacy
    policy_file: str = ""
    version: int | None = None

    @classmethod
    def build(cls, conn: sqlite3.Connection, audit: AuditLog, master_key: bytes,
              policy_file: str = "", connect: Callable[[], sqlite3.Connection] | None = None) -> PrivacyControls:
        """Load the policy in force (PolicyError naming the line when it is invalid), hook the `audit` surface into
        the audit log, and register the core's stores for retention and erasure. `connect` opens a connection of
        its own for the purge and erasure that the server runs in a worker thread."""
        versions = PolicyVersions(conn, audit)
        policy, version = versions.active(policy_file)
        privacy = Privacy(policy, derive_pseudonym_key(master_key))
        audit.scrub = lambda details: privacy.scrub("audit", details)
        retention = Retention(lambda: privacy.policy, audit, subject_resolver(conn, privacy.pseudonym),
                              privacy.pseudonym, connect=connect)
        for store in core_stores(conn, audit):
            retention.register(store)
        return cls(privacy, versions, retention, GatewayPrivacy(privacy), policy_file, version)

    def record_if_changed(self, actor: str = "supervisor") -> bool:
        """Audit `policy.change` (target privacy) when the policy in force at start differs from the last one
        recorded: an edited policies/privacy.toml is a change like one made through the API."""
        digest = self.privacy.policy.digest
        last = None
        for record in self.versions.audit.export(action="policy.change"):
            if record["target"] == "privacy" and record["outcome"] == "ok":
                last = record
        if last is not None and isinstance(last["details"], dict) and last["details"].get("digest") == digest:
            return False
        self.versions.audit.record(actor, "policy.change", "privacy", digest=digest,
                                   source=self.privacy.policy.source, version=self.version)
        return True

    def change_policy(self, text: str, actor: str) -> tuple[PolicyVersion, PrivacyPolicy]:
        """Validate, store as a new version, audit, and put in force at once."""
        stored, policy = self.versions.save(text, actor)
        self.privacy.use_policy(policy)
        self.version = stored.version
        return stored, policy
