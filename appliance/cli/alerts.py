"""`appliance alerts list|rules`: the alerts the server last evaluated, and the rules as a Prometheus rules file."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import Any

from appliance.cli.common import Add
from appliance.config import LoadedSettings
from appliance.datadir import DataDir


def cmd_alerts_list(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.observability.alerts.service import read_alerts_file

    data = DataDir(loaded.settings.data_path)
    data.require_initialised()
    listing = read_alerts_file(data.root)
    if listing is None:
        print("no alerts evaluated yet: the server has not run with this data dir (or not for one interval)",
              file=sys.stderr)
        return 0
    if args.json:
        print(json.dumps(listing, indent=2, sort_keys=True))
        return 0
    evaluated = listing.get("evaluated_at")
    age = time.time() - datetime.fromisoformat(evaluated).timestamp() if evaluated else None
    if age is not None and age > max(120.0, 6 * float(listing.get("interval") or 10)):
        print(f"warning: the last evaluation was {age:.0f} s ago, at {evaluated}; is `appliance serve` running?",
              file=sys.stderr)
    alerts: list[dict[str, Any]] = listing.get("alerts") or []
    if not alerts:
        print(f"no alert is pending or firing (evaluated {evaluated})")
        return 0
    for alert in alerts:
        labels = ",".join(f"{k}={v}" for k, v in sorted(alert["labels"].items())
                          if k not in ("alertname", "severity"))
        print(f"{alert['state']:<8} {alert['severity']:<8} {alert['name']:<26} {labels or '-':<30} "
              f"since {alert['since']}  {alert.get('summary', '')}")
    return 0


def cmd_alerts_rules(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.observability.alerts.promrules import rules_yaml
    from appliance.observability.alerts.rules import AlertRules

    sys.stdout.write(rules_yaml(AlertRules.load(args.file or loaded.settings.alerts.rules_file)))
    return 0


def register(sub: Any, add: Add) -> None:
    alerts = sub.add_parser("alerts", help="alerts of the appliance's own rules").add_subparsers(
        dest="sub", required=True)
    listing = add("list", cmd_alerts_list, "pending and firing alerts as the server last evaluated them", alerts)
    listing.add_argument("--json", action="store_true", help="print the server's listing as JSON")
    rules = add("rules", cmd_alerts_rules, "print the alert rules as a Prometheus rules file (YAML)", alerts)
    rules.add_argument("--file", help="an alerts.toml (default: the one in use)")
