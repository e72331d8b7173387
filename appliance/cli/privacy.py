"""`appliance privacy purge|erase|report` and `appliance policies check [DIR]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from appliance.cache.setup import cache_entries
from appliance.cli.common import Add, cli_actor
from appliance.config import LoadedSettings
from appliance.datadir import DataDir


def _controls(loaded: LoadedSettings) -> Any:
    from appliance.audit import AuditLog
    from appliance.gateway.responses.store import ConversationStore
    from appliance.privacy.controls import PrivacyControls

    data = DataDir(loaded.settings.data_path)
    data.require_initialised()
    conn = data.connect()
    controls = PrivacyControls.build(conn, AuditLog(conn), data.read_master_key(), loaded.settings.privacy.policy_file)
    controls.retention.register(ConversationStore(conn))  # responses stored by /v1/responses
    controls.retention.register(cache_entries(loaded.settings.cache, data.cache))
    if (documents := _rag_documents(loaded, data)) is not None:
        controls.retention.register(documents)
    return controls


def _rag_documents(loaded: LoadedSettings, data: DataDir) -> Any:
    """RAG documents, unless the running server holds their indexes (then its API does the job)."""
    from appliance.auth.rbac import Rbac
    from appliance.observability.metrics import Metrics
    from appliance.rag.embeddings import EmbeddingService
    from appliance.rag.index import IndexLocked
    from appliance.rag.retention import RagDocumentStore
    from appliance.rag.service import RagService

    settings = loaded.settings
    metrics = Metrics()
    rag = RagService(settings.rag, data.rag, EmbeddingService(settings.rag, data.cache / "embeddings", metrics),
                     Rbac.load(settings.auth.rbac_file), metrics)
    try:
        rag.index  # noqa: B018 (opens the indexes, or finds the server holding them)
    except IndexLocked:
        print("note: the running server holds the RAG indexes; RAG documents are left to it (its periodic purge, "
              "or POST /api/privacy/purge and /api/privacy/erasures)", file=sys.stderr)
        return None
    return RagDocumentStore(rag)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "nothing registered"


def cmd_purge(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    counts = _controls(loaded).retention.purge(cli_actor())
    print(f"purged (items past their retention): {_counts(counts)}")
    return 0


def cmd_erase(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    counts = _controls(loaded).retention.erase(args.subject, cli_actor())
    print(f"erased: {_counts(counts)}; audit records stay (append-only, no PII in the clear) until their retention")
    return 0


def cmd_report(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    controls = _controls(loaded)
    report = controls.retention.report()
    source = f"version {controls.version} (database)" if controls.version else controls.privacy.policy.source
    print(f"privacy policy: {source}, digest {report.policy_digest[:16]}")
    print(f"{'data class':<16} {'items':>8}  {'oldest':<32} {'retention':<18} note")
    for item in report.classes:
        print(f"{item.data_class:<16} {item.count:>8}  {item.oldest or '-':<32} {item.retention:<18} {item.note}")
    interval = controls.privacy.policy.purge_interval
    print(f"purge: every {int(interval.total_seconds() // 60)} min while `appliance serve` runs "
          "(or now: `appliance privacy purge`)")
    return 0


def cmd_policies_check(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.auth.rbac import Rbac, RbacError
    from appliance.observability.alerts.rules import AlertRules, AlertsError
    from appliance.privacy.policy import PolicyError, load_policy

    folder = Path(args.dir) if args.dir else None
    rbac = folder / "rbac.toml" if folder else Path(loaded.settings.auth.rbac_file or "")
    privacy = folder / "privacy.toml" if folder else Path(loaded.settings.privacy.policy_file or "")
    alerts = folder / "alerts.toml" if folder else Path(loaded.settings.alerts.rules_file or "")
    failed = False
    checks: tuple[tuple[str, Any, Path], ...] = (("roles", Rbac.load, rbac), ("privacy", load_policy, privacy),
                                                 ("alerts", AlertRules.load, alerts))
    for name, check, path in checks:
        if folder and name == "alerts" and not path.exists():  # a folder from before the alert rules
            print(f"skipped: no alerts.toml in {folder}")
            continue
        try:
            loaded_policy = check(path if str(path) not in ("", ".") else "")
        except (RbacError, PolicyError, AlertsError) as exc:
            print(f"appliance: {name} policy: {exc}", file=sys.stderr)
            failed = True
        else:
            print(f"ok: {name} policy {getattr(loaded_policy, 'source', path)}")
    return 1 if failed else 0


def register(sub: Any, add: Add) -> None:
    privacy = sub.add_parser("privacy", help="retention, erasure and the privacy report").add_subparsers(
        dest="sub", required=True)
    add("purge", cmd_purge, "delete everything past its retention now, in every store", privacy)
    erase = add("erase", cmd_erase, "delete everything held about a user or a person, in every store", privacy)
    erase.add_argument("--subject", required=True, help="a user name or an email address")
    add("report", cmd_report, "what classes of data are held: counts, oldest item, retention", privacy)
    policies = sub.add_parser("policies", help="policy files").add_subparsers(dest="sub", required=True)
    check = add("check", cmd_policies_check, "validate rbac.toml, privacy.toml and alerts.toml; exits 1 naming the "
                "wrong line", policies)
    check.add_argument("dir", nargs="?", help="a folder holding rbac.toml, privacy.toml and alerts.toml (default: "
                       "the files in use)")
