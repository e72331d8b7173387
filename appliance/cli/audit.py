"""`appliance audit verify|export`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from appliance.cli.common import Add, open_audit
from appliance.config import LoadedSettings
from appliance.datadir import DataDir


def cmd_audit_verify(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    result = open_audit(DataDir(loaded.settings.data_path)).verify()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not result.ok:
        reason = result.reason.removeprefix(f"record {result.first_broken_seq}: ")
        print(f"audit log BROKEN at record {result.first_broken_seq}: {reason}; the {result.count} records "
              "before it are intact. Keep this database as evidence, and restore from a backup", file=sys.stderr)
        return 1
    print(f"audit log intact: {result.count} records (last hash {result.last_hash}; keep it off the box to "
          "detect a rewritten or truncated log later)")
    return 0


def cmd_audit_export(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    audit = open_audit(DataDir(loaded.settings.data_path))
    try:
        for record in audit.export(since=args.since, until=args.until, action=args.action, actor=args.actor):
            sys.stdout.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `appliance audit export | head` is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def register(sub: Any, add: Add) -> None:
    audit = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(dest="sub", required=True)
    add("verify", cmd_audit_verify, "check the hash chain; exits 1 naming the first broken record", audit)
    export = add("export", cmd_audit_export, "print audit records as JSON lines, oldest first", audit)
    export.add_argument("--since", help="ISO-8601 time, inclusive (UTC when no zone is given)")
    export.add_argument("--until", help="ISO-8601 time, exclusive")
    export.add_argument("--action", help="only this action, e.g. key.create, model.pull")
    export.add_argument("--actor", help="only this actor, e.g. cli:root")
