"""`appliance backup PATH`, `appliance backup verify PATH` and `appliance restore PATH` (appliance.backup)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from appliance.backup import BackupError, BackupReport, restore_backup, take_backup, verify_backup
from appliance.cli.common import Add
from appliance.config import LoadedSettings


def _summary(report: BackupReport) -> str:
    keys = "with the key ring" if report.keys_included else "WITHOUT the key ring (models can't be decrypted)"
    return f"{report.files} files ({report.databases} databases, {report.bytes / 2**20:.1f} MiB), {keys}"


def cmd_backup(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    words = args.words
    try:
        if words[0] == "verify" and len(words) == 2:
            if problems := verify_backup(Path(words[1])):
                print("\n".join(problems), file=sys.stderr)
                print(f"appliance: {words[1]} does not verify ({len(problems)} problems)", file=sys.stderr)
                return 1
            print(f"{words[1]}: every file matches the manifest and every database passes integrity_check")
            return 0
        if len(words) != 1:
            print("appliance: usage: appliance backup [--no-keys] PATH | appliance backup verify PATH",
                  file=sys.stderr)
            return 2
        report = take_backup(loaded.settings.data_path, Path(words[0]), include_keys=not args.no_keys)
    except BackupError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {_summary(report)} to {words[0]}")
    return 0


def cmd_restore(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    try:
        report = restore_backup(Path(args.path), loaded.settings.data_path)
    except BackupError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    print(f"restored {_summary(report)} into {loaded.settings.data_path}")
    return 0


def register(sub: Any, add: Add) -> None:
    backup = add("backup", cmd_backup, "copy the data dir to PATH while the server runs (SQLite's online backup "
                 "for the databases); `backup verify PATH` checks a backup without restoring it")
    backup.add_argument("words", nargs="+", metavar="PATH | verify PATH")
    backup.add_argument("--no-keys", action="store_true", help="leave the key ring out (keep it apart yourself)")
    restore = add("restore", cmd_restore, "fill an empty data dir from a backup (verified first)")
    restore.add_argument("path", metavar="PATH")
