"""The key ring sealed with a passphrase, for backups: every file of keys/ in one AES-256-GCM box whose key is
derived from the passphrase with Argon2id (memory-hard; the parameters the master passphrase uses).

The box is a small JSON document: the KDF's name, salt and costs, the nonce, and the ciphertext (base64); all
fields but the ciphertext are its associated data, so changing a cost or the salt fails like a wrong
passphrase. The plaintext is a JSON map of each file's path under keys/ to its bytes (base64)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.crypto.keyring import ARGON2_ITERATIONS, ARGON2_LANES, ARGON2_MEMORY_KIB, derive_key

FORMAT = "appliance sealed key ring"
VERSION = 1
NONCE_LEN = 12
SALT_LEN = 16
TAG_LEN = 16
MIN_PASSPHRASE = 8
# costs a box may ask for when opened: enough for today's parameters, never a memory bomb from a crafted file
_MAX_MEMORY_KIB = 1 << 21  # 2 GiB
_MAX_ITERATIONS = 64


class SealError(Exception):
    """A sealed key ring can't be made or opened; the message says why."""


def check_passphrase(passphrase: str) -> None:
    if len(passphrase) < MIN_PASSPHRASE:
        raise SealError(f"the backup passphrase has {len(passphrase)} characters; use at least {MIN_PASSPHRASE} "
                        "(a few random words)")


def _aad(box: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in box.items() if k != "ciphertext"}, sort_keys=True).encode()


def seal_folder(folder: Path, passphrase: str) -> bytes:
    """Every regular file under `folder`, sealed with `passphrase`."""
    check_passphrase(passphrase)
    files = {p.relative_to(folder).as_posix(): base64.b64encode(p.read_bytes()).decode()
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}
    kdf = {"name": "argon2id", "salt": os.urandom(SALT_LEN).hex(), "iterations": ARGON2_ITERATIONS,
           "lanes": ARGON2_LANES, "memory_cost": ARGON2_MEMORY_KIB}
    box: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kdf": kdf, "nonce": os.urandom(NONCE_LEN).hex()}
    key = derive_key(passphrase, kdf)
    sealed = AESGCM(key).encrypt(bytes.fromhex(box["nonce"]), json.dumps(files).encode(), _aad(box))
    box["ciphertext"] = base64.b64encode(sealed).decode()
    return json.dumps(box, indent=1).encode()


def structure_problems(raw: bytes) -> list[str]:
    """What is malformed in a sealed key ring, without the passphrase; empty when it is well formed."""
    try:
        box = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"not a sealed key ring ({exc})"]
    if not isinstance(box, dict) or box.get("format") != FORMAT:
        return ["not a sealed key ring (no format marker)"]
    if box.get("version") != VERSION:
        return [f"sealed key ring version {box.get('version')!r}; this appliance reads {VERSION}"]
    problems = []
    kdf = box.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != "argon2id":
        problems.append("its KDF is not argon2id")
    else:
        try:
            if len(bytes.fromhex(str(kdf["salt"]))) < SALT_LEN:
                problems.append("its salt is too short")
            memory, iterations, lanes = int(kdf["memory_cost"]), int(kdf["iterations"]), int(kdf["lanes"])
            if not (8 * lanes <= memory <= _MAX_MEMORY_KIB and 1 <= iterations <= _MAX_ITERATIONS and 1 <= lanes):
                problems.append(f"its KDF costs are out of range (memory {memory} KiB, {iterations} iterations, "
                                f"{lanes} lanes)")
        except (KeyError, ValueError, TypeError):
            problems.append("its KDF parameters are incomplete")
    try:
        if len(bytes.fromhex(str(box.get("nonce")))) != NONCE_LEN:
            problems.append("its nonce has the wrong length")
        if len(base64.b64decode(str(box.get("ciphertext")), validate=True)) <= TAG_LEN:
            problems.append("its ciphertext is empty")
    except (ValueError, binascii.Error):
        problems.append("its nonce or ciphertext is not encoded as expected")
    return problems


def open_sealed(raw: bytes, passphrase: str) -> dict[str, bytes]:
    """The files in a sealed key ring (path under keys/ -> bytes); SealError when it is malformed or the
    passphrase does not open it."""
    if problems := structure_problems(raw):
        raise SealError("; ".join(problems))
    box = json.loads(raw)
    key = derive_key(passphrase, box["kdf"])
    try:
        plain = AESGCM(key).decrypt(bytes.fromhex(box["nonce"]), base64.b64decode(box["ciphertext"]), _aad(box))
    except InvalidTag:
        raise SealError("the passphrase does not open the backup's key ring (wrong passphrase, or the sealed "
                        "file was changed)") from None
    files = json.loads(plain)
    for name in files:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            raise SealError(f"the sealed key ring names an unsafe path {name!r}")
    return {name: base64.b64decode(content) for name, content in files.items()}
