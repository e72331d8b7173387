"""Backups of a data dir (`appliance backup PATH`, `backup verify PATH`, `restore PATH`): the SQLite databases
(the appliance's, Chroma's and the keyword index's) copied with SQLite's online backup API, so a running server
may keep writing; model blobs copied as files; the key ring sealed with a passphrase (`keys.sealed`, see
appliance.crypto.sealed), left out, or copied unwrapped only when asked to; a manifest with each file's SHA-256
that `verify` checks without restoring. The response cache, sockets and staging files are left out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from appliance import __version__
from appliance.crypto.sealed import SealError, check_passphrase, open_sealed, seal_folder, structure_problems

MANIFEST = "manifest.json"
FORMAT = 2
READS = (1, 2)  # format 1: no `keys` field, the key ring (if any) copied as files
SEALED_KEYS = "keys.sealed"
PASSPHRASE_ENV = "APPLIANCE_BACKUP_PASSPHRASE"  # noqa: S105 (the name of a variable, not a secret)
KeysMode = Literal["sealed", "unwrapped", "none"]
LEFT_OUT = ("cache", "run", "tmp")
"""Top-level folders of the data dir that a backup leaves out: rebuilt or refilled on their own."""
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
SQLITE_HEADER = b"SQLite format 3\x00"


class BackupError(Exception):
    """A backup can't be taken, verified or restored; the message says why and what to do."""


@dataclass(frozen=True)
class BackupReport:
    files: int
    databases: int
    bytes: int
    keys: KeysMode


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sources(root: Path, include_keys: bool) -> list[Path]:
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or path.is_symlink() or relative.parts[0] in LEFT_OUT:
            continue
        if relative.parts[0] == "keys" and not include_keys:
            continue
        if path.name.endswith(SQLITE_SIDE_FILES) or path.name == "lock":
            continue
        found.append(path)
    return found


def _copy_database(source: Path, target: Path) -> None:
    """A consistent copy while other connections write: SQLite's online backup, one transaction's view."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # a single file, no WAL beside it
        finally:
            dst.close()
    finally:
        src.close()


def take_backup(data_root: Path, target: Path, keys: KeysMode = "sealed", passphrase: str | None = None
                ) -> BackupReport:
    """Copy the data dir at `data_root` into `target` (a new or empty folder). The key ring is sealed with
    `passphrase` (keys="sealed", the only way it goes in unless keys="unwrapped" is asked for) or left out."""
    if not (data_root / "appliance.db").is_file():
        raise BackupError(f"{data_root} is not an initialised data dir (no appliance.db); check --data-dir")
    if keys == "sealed":
        if not passphrase:
            raise BackupError("a backup holds the key ring only sealed with a passphrase: pipe one with "
                              f"--passphrase-stdin or set {PASSPHRASE_ENV}; or leave the keys out with --no-keys "
                              "(or, on an already encrypted medium, copy them unwrapped with --keys-unwrapped)")
        try:
            check_passphrase(passphrase)
        except SealError as exc:
            raise BackupError(str(exc)) from None
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} is not empty; back up into a new folder")
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    files: dict[str, dict[str, object]] = {}
    databases = 0
    # Databases first, then the files they refer to: a blob written after its row was copied is harmless,
    # while a row without its blob would not be.
    sources = sorted(_sources(data_root, keys == "unwrapped"), key=lambda p: not _is_sqlite(p))
    for source in sources:
        relative = source.relative_to(data_root)
        copy = target / relative
        copy.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        is_db = _is_sqlite(source)
        if is_db:
            _copy_database(source, copy)
            databases += 1
        else:
            shutil.copyfile(source, copy)
        copy.chmod(0o600)
        files[relative.as_posix()] = {"sha256": _sha256(copy), "bytes": copy.stat().st_size, "sqlite": is_db}
    if keys == "sealed" and passphrase:
        # last: every blob copied above has its wrapped data key in keys/ by now
        sealed = target / SEALED_KEYS
        sealed.write_bytes(seal_folder(data_root / "keys", passphrase))
        sealed.chmod(0o600)
        files[SEALED_KEYS] = {"sha256": _sha256(sealed), "bytes": sealed.stat().st_size, "sqlite": False}
    manifest = {"format": FORMAT, "appliance": __version__, "created": datetime.now(UTC).isoformat(),
                "keys": keys, "keys_included": keys != "none", "files": files}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return BackupReport(len(files), databases, sum(int(str(f["bytes"])) for f in files.values()), keys)


def _keys_mode(manifest: dict[str, object]) -> KeysMode:
    mode = manifest.get("keys", "unwrapped" if manifest.get("keys_included") else "none")
    if mode not in ("sealed", "unwrapped", "none"):
        raise BackupError(f"the manifest names an unknown way of keeping the keys: {mode!r}")
    return mode


def _manifest(backup: Path) -> dict[str, object]:
    try:
        manifest = json.loads((backup / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{backup} is not a backup (no {MANIFEST})") from None
    except json.JSONDecodeError as exc:
        raise BackupError(f"{backup / MANIFEST} is damaged: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READS:
        raise BackupError(f"{backup} has backup format {manifest.get('format')!r}; this appliance reads "
                          f"{', '.join(map(str, READS))}")
    return manifest


def _sealed_problems(backup: Path, manifest: dict[str, object], passphrase: str | None) -> list[str]:
    """The sealed key ring's problems: its structure always; whether it opens when the passphrase is given."""
    if _keys_mode(manifest) != "sealed":
        return []
    path = backup / SEALED_KEYS
    if not path.is_file():
        return [f"{SEALED_KEYS}: missing (the manifest says the key ring is sealed in it)"]
    raw = path.read_bytes()
    if passphrase is None:
        return [f"{SEALED_KEYS}: {problem}" for problem in structure_problems(raw)]
    try:
        open_sealed(raw, passphrase)
    except SealError as exc:
        return [f"{SEALED_KEYS}: {exc}"]
    return []


def verify_backup(backup: Path, passphrase: str | None = None) -> list[str]:
    """What is wrong with the backup at `backup`, one line each; empty when every file is whole, every
    database passes SQLite's integrity_check and the sealed key ring is well formed (and opens with
    `passphrase` when one is given)."""
    manifest = _manifest(backup)
    files = manifest["files"]
    assert isinstance(files, dict)
    problems = []
    present = {p.relative_to(backup).as_posix() for p in backup.rglob("*") if p.is_file()} - {MANIFEST}
    for name in sorted(present - files.keys()):
        problems.append(f"{name}: not in the manifest")
    for name, entry in sorted(files.items()):
        path = backup / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if _sha256(path) != entry["sha256"]:
            problems.append(f"{name}: its SHA-256 differs from the manifest's (changed or damaged)")
            continue
        if entry.get("sqlite"):
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                result = conn.execute("PRAGMA integrity_check").fetchall()
            except sqlite3.DatabaseError as exc:
                result = [(str(exc),)]
            finally:
                conn.close()
            if result != [("ok",)]:
                problems.append(f"{name}: integrity_check: {'; '.join(str(r[0]) for r in result[:5])}")
    if not any(p.startswith(SEALED_KEYS) for p in problems):
        problems += _sealed_problems(backup, manifest, passphrase)
    return problems


def restore_backup(backup: Path, data_root: Path, passphrase: str | None = None) -> BackupReport:
    """Fill the empty data dir `data_root` from the backup at `backup`, after verifying it; a sealed key ring
    needs its passphrase, and nothing is written unless it opens."""
    if problems := verify_backup(backup):
        raise BackupError(f"{backup} does not verify, nothing restored:\n" + "\n".join(problems))
    if data_root.exists() and any(data_root.iterdir()):
        raise BackupError(f"{data_root} is not empty; restore into an empty data dir (stop the server and move "
                          "the old one aside first)")
    manifest = _manifest(backup)
    files = manifest["files"]
    assert isinstance(files, dict)
    keys = _keys_mode(manifest)
    key_files: dict[str, bytes] = {}
    if keys == "sealed":
        if not passphrase:
            raise BackupError(f"{backup}'s key ring is sealed with a passphrase: pipe it with --passphrase-stdin or "
                              f"set {PASSPHRASE_ENV}; nothing restored")
        try:
            key_files = open_sealed((backup / SEALED_KEYS).read_bytes(), passphrase)
        except SealError as exc:
            raise BackupError(f"{exc}; nothing restored") from None
    old_umask = os.umask(0o077)
    try:
        data_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in LEFT_OUT:  # refilled by the server: the cache, its sockets, staging
            (data_root / folder).mkdir(mode=0o700, exist_ok=True)
        for name in files:
            if name == SEALED_KEYS:
                continue
            target = data_root / name
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copyfile(backup / name, target)
            target.chmod(0o600)
        for name, content in key_files.items():
            target = data_root / "keys" / name
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(0o600)
    finally:
        os.umask(old_umask)
    databases = sum(1 for entry in files.values() if entry.get("sqlite"))
    return BackupReport(len(files) - (keys == "sealed") + len(key_files), databases,
                        sum(int(e["bytes"]) for e in files.values()), keys)
