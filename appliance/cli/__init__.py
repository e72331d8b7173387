"""The `appliance` command: init, serve, doctor, config, models, keys, users, audit.

One module per domain registers its subcommands; this one builds the parser and maps errors to exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from appliance.cli import alerts, audit, backup, cache, crypto, keys, models, oidc, rag, server, users
from appliance.cli import privacy as privacy_cli
from appliance.cli.common import KEEP, Handler
from appliance.config import ConfigError, LoadedSettings, load_settings
from appliance.errors import ApplianceError

__all__ = ["KEEP", "build_parser", "main"]


def _settings(args: argparse.Namespace) -> LoadedSettings:
    return load_settings(data_dir=args.data_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="A batteries-included AI server for one box.")
    parser.add_argument("--data-dir", help="data directory (default: $APPLIANCE_DATA_DIR, else ./.appliance "
                        "in a checkout, /var/lib/appliance for a system install)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, helptext: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(handler=handler)
        return p

    for domain in (server, models, keys, users, audit, cache, crypto, rag, alerts, backup, oidc):
        domain.register(sub, add)
    privacy_cli.register(sub, add)  # privacy purge|erase|report, policies check
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loaded = _settings(args)
        return int(args.handler(args, loaded))
    except ConfigError as exc:
        print(f"appliance: configuration error: {exc}", file=sys.stderr)
        return 2
    except ApplianceError as exc:
        print(f"appliance: {exc.message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

