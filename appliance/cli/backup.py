"""`appliance backup PATH`, `appliance backup verify PATH` and `appliance restore PATH` (appliance.backup).

The key ring's passphrase comes from stdin (`--passphrase-stdin`, one line) or APPLIANCE_BACKUP_PASSPHRASE,
never from the command line, where other users of the box could read it. Without one (and without --no-keys), the
key ring is copied as the data dir holds it, with a warning: `appliance backup PATH` alone is a contract scripts rely
on (DESIGN section 4)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from appliance.backup import (
    PASSPHRASE_ENV,
    BackupError,
    BackupReport,
    KeysMode,
    restore_backup,
    take_backup,
    verify_backup,
)
from appliance.cli.common import Add
from appliance.config import LoadedSettings

KEYS_SAID = {"sealed": "with the key ring sealed with the passphrase",
             "unwrapped": "with the key ring UNWRAPPED (keep this backup on an encrypted medium)",
             "none": "WITHOUT the key ring (models and API keys need the original keys/ folder)"}


def _summary(report: BackupReport) -> str:
    return f"{report.files} files ({report.databases} databases, {report.bytes / 2**20:.1f} MiB), " \
           f"{KEYS_SAID[report.keys]}"


def _passphrase(args: argparse.Namespace) -> str | None:
    if args.passphrase_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return os.environ.get(PASSPHRASE_ENV) or None


def cmd_backup(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    words = args.words
    try:
        if words[0] == "verify" and len(words) == 2:
            passphrase = _passphrase(args)
            if problems := verify_backup(Path(words[1]), passphrase):
                print("\n".join(problems), file=sys.stderr)
                print(f"appliance: {words[1]} does not verify ({len(problems)} problems)", file=sys.stderr)
                return 1
            ring = "the sealed key ring opens with the passphrase" if passphrase else \
                "the key ring (if sealed) is well formed; give the passphrase to check that it opens"
            print(f"{words[1]}: every file matches the manifest, every database passes integrity_check; {ring}")
            return 0
        if len(words) != 1:
            print("appliance: usage: appliance backup [--no-keys | --keys-unwrapped] [--passphrase-stdin] PATH | "
                  "appliance backup verify PATH [--passphrase-stdin]", file=sys.stderr)
            return 2
        keys: KeysMode = "none" if args.no_keys else "unwrapped" if args.keys_unwrapped else "sealed"
        passphrase = _passphrase(args) if keys == "sealed" else None
        if keys == "sealed" and not passphrase:  # `appliance backup PATH` alone keeps working (DESIGN section 4)
            keys = "unwrapped"
            print(f"appliance: warning: no passphrase given, so the key ring is copied as it is on disk (as safe as "
                  f"the data dir: sealed only by the master passphrase if you set one); to seal it, pipe a "
                  f"passphrase with --passphrase-stdin or set {PASSPHRASE_ENV}, or leave it out with --no-keys",
                  file=sys.stderr)
        report = take_backup(loaded.settings.data_path, Path(words[0]), keys, passphrase)
    except BackupError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {_summary(report)} to {words[0]}")
    return 0


def cmd_restore(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    try:
        report = restore_backup(Path(args.path), loaded.settings.data_path, _passphrase(args))
    except BackupError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    print(f"restored {_summary(report)} into {loaded.settings.data_path}")
    return 0


def _passphrase_option(parser: Any) -> None:
    parser.add_argument("--passphrase-stdin", action="store_true",
                        help=f"read the key ring's passphrase from stdin (else {PASSPHRASE_ENV})")


def register(sub: Any, add: Add) -> None:
    backup = add("backup", cmd_backup, "copy the data dir to PATH while the server runs (SQLite's online backup "
                 "for the databases; the key ring sealed with a passphrase); `backup verify PATH` checks a backup "
                 "without restoring it")
    backup.add_argument("words", nargs="+", metavar="PATH | verify PATH")
    keys = backup.add_mutually_exclusive_group()
    keys.add_argument("--no-keys", action="store_true", help="leave the key ring out (keep it apart yourself)")
    keys.add_argument("--keys-unwrapped", action="store_true",
                      help="copy the key ring as the data dir holds it, without a passphrase and without the warning "
                           "(what a backup does when no passphrase is given; only onto an encrypted medium)")
    _passphrase_option(backup)
    restore = add("restore", cmd_restore, "fill an empty data dir from a backup (verified first; a sealed key ring "
                  "needs its passphrase)")
    restore.add_argument("path", metavar="PATH")
    _passphrase_option(restore)
