"""`appliance crypto rotate|status`: the key ring that wraps the data keys of the model store."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from appliance.cli.common import Add, cli_actor, open_audit
from appliance.config import LoadedSettings
from appliance.datadir import DataDir


def _store(loaded: LoadedSettings) -> Any:
    from appliance.registry.store import open_model_store

    data = DataDir(loaded.settings.data_path)
    data.require_initialised()
    return open_model_store(data, loaded.settings.crypto)


def _watermark_keys(store: Any) -> Any:
    from appliance.watermark.keys import WatermarkKeys

    return WatermarkKeys(store.ring, store.wrapped)


def cmd_crypto_rotate(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.audit import audited

    store = _store(loaded)
    audit = open_audit(DataDir(loaded.settings.data_path))
    with audited(audit, cli_actor(), "crypto.rotate", "key-ring") as event:
        old = store.ring.active_version()
        new = store.ring.create_version()
        report = store.rewrap_all()
        watermark = _watermark_keys(store).rewrap()
        event.details.update(from_version=old, to_version=new, rewrapped=len(report.rewrapped),
                             failed=len(report.failed), watermark_rewrapped=watermark)
    for sha256, reason in report.failed.items():
        print(f"NOT REWRAPPED sha256-{sha256}: {reason}; `appliance models verify` names its model", file=sys.stderr)
    print(f"key version {new} is active; {len(report.rewrapped)} data key(s) rewrapped, "
          f"{len(report.current)} already current, weights untouched")
    if args.retire:
        in_use = set(store.key_versions_in_use().values())
        if (watermark_version := _watermark_keys(store).key_version()) is not None:
            in_use.add(watermark_version)
        for version in store.ring.versions():
            if version != new and version not in in_use:
                store.ring.retire(version)
                audit.record(cli_actor(), "crypto.retire", f"key-version-{version}")
                print(f"retired key version {version}")
        if still := sorted(in_use - {new}):
            print(f"kept key version(s) {still}: some data keys are still wrapped under them", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_crypto_status(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    store = _store(loaded)
    versions = store.ring.versions()
    print(f"key source: {loaded.settings.crypto.key_source}; versions: {versions or 'none yet'}"
          + (f", active {versions[-1]}" if versions else ""))
    counts: dict[int, int] = {}
    for version in store.key_versions_in_use().values():
        counts[version] = counts.get(version, 0) + 1
    for version, count in sorted(counts.items()):
        print(f"  version {version}: wraps {count} model blob(s)")
    if (watermark_version := _watermark_keys(store).key_version()) is not None:
        print(f"  version {watermark_version}: wraps the watermark secret")
    return 0


def register(sub: Any, add: Add) -> None:
    crypto = sub.add_parser("crypto", help="encryption keys of the model store").add_subparsers(dest="sub",
                                                                                                required=True)
    rotate = add("rotate", cmd_crypto_rotate, "make a new key version and rewrap every model's data key under it "
                 "(the weights are not re-encrypted); safe to run again after an interruption", crypto)
    rotate.add_argument("--retire", action="store_true",
                        help="then delete the key versions that no longer wrap any data key")
    add("status", cmd_crypto_status, "key versions and how many model blobs each one wraps", crypto)
