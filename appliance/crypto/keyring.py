"""The versioned ring of key-encryption keys (KEKs) in the data dir's keys/ folder.

Each version is a file: `kek-NNNNNN.key` (32 random bytes, the default) or `kek-NNNNNN.argon2` (Argon2id
parameters and salt; the key is derived from the master passphrase, APPLIANCE_MASTER_PASSPHRASE or a prompt).
The highest version is the active one: new data keys are wrapped under it; older versions still unwrap
until they are retired. Files are 0600 in a 0700 folder and written crash-safely."""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from appliance.crypto.files import atomic_write, crash_point, remove_stale_temps
from appliance.errors import ModelUnavailable

KEY_LEN = 32
PASSPHRASE_ENV = "APPLIANCE_MASTER_PASSPHRASE"  # noqa: S105 (the name of a variable, not a secret)
KeySource = Literal["file", "passphrase"]
_NAME = re.compile(r"^kek-(\d{6})\.(key|argon2)$")
_CHECK = b"appliance key-encryption key check"
# OWASP's first Argon2id choice is m=47 MiB, t=1; we spend a little more, once per process and version.
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_ITERATIONS = 3
ARGON2_LANES = 4


class KeyRingError(ModelUnavailable):
    """A key version is missing or cannot be opened; the message says what to do."""

    code = "key_unavailable"


def passphrase_from_env_or_prompt() -> str:
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value
    if sys.stdin.isatty():
        return getpass.getpass("appliance master passphrase: ")
    raise KeyRingError(f"crypto.key_source is 'passphrase' but {PASSPHRASE_ENV} is not set and there is no "
                       "terminal to ask on; set it (e.g. in the service's credentials) and try again")


def derive_key(passphrase: str, params: dict[str, object]) -> bytes:
    return Argon2id(salt=bytes.fromhex(str(params["salt"])), length=KEY_LEN, iterations=int(str(params["iterations"])),
                    lanes=int(str(params["lanes"])), memory_cost=int(str(params["memory_cost"]))).derive(
        passphrase.encode())


class KeyRing:
    def __init__(self, directory: Path, source: KeySource = "file",
                 passphrase: Callable[[], str] = passphrase_from_env_or_prompt) -> None:
        self.directory = directory
        self.source = source
        self._passphrase = passphrase
        self._cached_passphrase: str | None = None
        self._keys: dict[int, bytes] = {}

    def _files(self) -> dict[int, Path]:
        found: dict[int, Path] = {}
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if m := _NAME.match(path.name):
                    found[int(m.group(1))] = path
        return found

    def versions(self) -> list[int]:
        return sorted(self._files())

    def active_version(self) -> int:
        """The version new data keys are wrapped under; the first one is made on first use."""
        versions = self.versions()
        return versions[-1] if versions else self.create_version(expected_latest=0)

    def active(self) -> tuple[int, bytes]:
        version = self.active_version()
        return version, self.key(version)

    def key(self, version: int) -> bytes:
        if version not in self._keys:
            path = self._files().get(version)
            if path is None:
                raise KeyRingError(f"key version {version} is not in {self.directory} (retired or lost); a model "
                                   "wrapped under it cannot be opened: restore the key file from a backup or pull "
                                   "the model again")
            self._keys[version] = self._load(version, path)
        return self._keys[version]

    def _get_passphrase(self) -> str:
        if self._cached_passphrase is None:
            self._cached_passphrase = self._passphrase()
        return self._cached_passphrase

    def _load(self, version: int, path: Path) -> bytes:
        if path.suffix == ".key":
            key = path.read_bytes()
            if len(key) != KEY_LEN:
                raise KeyRingError(f"{path} is damaged ({len(key)} bytes, expected {KEY_LEN}); restore it from a "
                                   "backup")
            return key
        params = json.loads(path.read_text())
        key = derive_key(self._get_passphrase(), params)
        try:
            AESGCM(key).decrypt(bytes.fromhex(params["check_nonce"]), bytes.fromhex(params["check"]),
                                f"kek-v{version}".encode())
        except InvalidTag:
            raise KeyRingError(f"the master passphrase does not open key version {version}; check "
                               f"{PASSPHRASE_ENV}") from None
        return key

    def create_version(self, expected_latest: int | None = None) -> int:
        """Write the next version (crash-safely) and make it the active one."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        remove_stale_temps(self.directory)
        latest = max(self.versions(), default=0)
        if expected_latest is not None and latest != expected_latest:
            return latest  # someone else made it meanwhile
        version = latest + 1
        if self.source == "file":
            key = os.urandom(KEY_LEN)
            path, content = self.directory / f"kek-{version:06d}.key", key
        else:
            params: dict[str, object] = {"kdf": "argon2id", "salt": os.urandom(16).hex(),
                                         "iterations": ARGON2_ITERATIONS, "lanes": ARGON2_LANES,
                                         "memory_cost": ARGON2_MEMORY_KIB}
            key = derive_key(self._get_passphrase(), params)
            nonce = os.urandom(12)
            params.update(check_nonce=nonce.hex(), check=AESGCM(key).encrypt(nonce, _CHECK, f"kek-v{version}".encode())
                          .hex())
            path, content = self.directory / f"kek-{version:06d}.argon2", json.dumps(params).encode()
        atomic_write(path, content)
        self._keys[version] = key
        crash_point("new-key")
        return version

    def retire(self, version: int) -> None:
        """Delete an old version; models still wrapped under it would become unreadable, so the caller checks."""
        if version == self.active_version():
            raise KeyRingError(f"key version {version} is the active one and cannot be retired; rotate first")
        path = self._files().get(version)
        if path is not None:
            path.unlink()
        self._keys.pop(version, None)
