"""`appliance cache clear|stats`: the response cache, also while the server runs (diskcache is safe across
processes)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Collection
from typing import Any

from appliance.cli.common import Add, cli_actor, open_audit
from appliance.config import LoadedSettings
from appliance.datadir import DataDir


def _open(loaded: LoadedSettings) -> Any:
    from appliance.cache.service import open_cache

    data = DataDir(loaded.settings.data_path)
    data.require_initialised()
    return open_cache(loaded.settings.cache, data.cache)


def cmd_cache_clear(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.audit import audited

    audit = open_audit(DataDir(loaded.settings.data_path))
    with contextlib.closing(_open(loaded)) as cache, \
            audited(audit, cli_actor(), "cache.clear", args.partition or "*") as event:
        cleared = cache.clear(args.partition)
        event.details["entries"] = cleared
    print(f"cleared {cleared} cached responses" + (f" of {args.partition}" if args.partition else ""))
    return 0


def cmd_cache_stats(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    with contextlib.closing(_open(loaded)) as cache:
        report = cache.report()
    oldest = "-" if report.oldest_age_seconds is None else f"{report.oldest_age_seconds:.0f} s"
    print(f"{report.entries} entries, {report.bytes / 2**20:.1f} MiB of {report.size_limit_bytes / 2**20:.0f} MiB, "
          f"oldest {oldest}, in {report.directory}")
    for partition, count in sorted(report.partitions.items()):
        print(f"{partition}\t{count}")
    return 0


def forget_removed_models(loaded: LoadedSettings, installed_sha256s: Collection[str]) -> None:
    """After `models rm` or a pull that replaced a model: its cached answers go (a running server would no longer
    serve them anyway, since keys name the model version; this frees the space)."""
    with contextlib.closing(_open(loaded)) as cache:
        if dropped := cache.drop_models_except(installed_sha256s):
            print(f"dropped {dropped} cached responses of the model version that went")


def register(sub: Any, add: Add) -> None:
    cache = sub.add_parser("cache", help="the response cache").add_subparsers(dest="sub", required=True)
    clear = add("clear", cmd_cache_clear, "drop cached responses: all, or one partition's", cache)
    clear.add_argument("--partition", help="user:<id>, key:<id> or role:<name> (`appliance cache stats` lists them)")
    add("stats", cmd_cache_stats, "entries, size and entries per partition", cache)
