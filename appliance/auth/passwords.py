"""Password hashing with Argon2id (cryptography's), stored as self-describing PHC strings, and the password policy.

A stored hash reads `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>` (unpadded standard base64, as the PHC string
format specifies). Hashes made with a server-side pepper (Argon2's `secret` input, derived from the master key)
carry the spec's optional `keyid` parameter, `...,p=1,keyid=<id>$...`, naming which pepper they need; hashes
without it still verify, and are upgraded at the next successful login like hashes with weaker parameters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from appliance.errors import InvalidRequest

# OWASP Password Storage Cheat Sheet (2024/2025): Argon2id with m=19 MiB, t=2, p=1 is the baseline. One hash
# takes about 40 ms and 19 MiB on one core here, affordable beside model inference. Raise these and every user's
# hash is upgraded at their next successful login (`needs_rehash`).
MEMORY_KIB = 19456
ITERATIONS = 2
LANES = 1
SALT_BYTES = 16
HASH_BYTES = 32
ARGON2_VERSION = 19  # 0x13, the only version cryptography implements

MIN_LENGTH = 12
MAX_LENGTH = 1024  # long enough for any passphrase, short enough that hashing cannot be abused for load

# Bounds on what a stored hash may ask for, so that a damaged or planted row cannot make a login allocate gigabytes.
_MAX_MEMORY_KIB = 1 << 21  # 2 GiB
_MAX_ITERATIONS = 64
_MAX_LANES = 64
_KEYID_BYTES = 6
_B64 = r"[A-Za-z0-9+/]+"
_N = "([0-9]{1,10})"  # ASCII digits only (\d would take other scripts' digits), and no absurd lengths
_PHC = re.compile(rf"\$argon2id\$v={_N}\$m={_N},t={_N},p={_N}(?:,keyid=({_B64}))?\$({_B64})\$({_B64})")


@dataclass(frozen=True)
class Argon2Params:
    memory_kib: int = MEMORY_KIB
    iterations: int = ITERATIONS
    lanes: int = LANES
    salt_bytes: int = SALT_BYTES
    hash_bytes: int = HASH_BYTES

    def weaker_than(self, other: Argon2Params) -> bool:
        return (self.memory_kib < other.memory_kib or self.iterations < other.iterations
                or self.lanes < other.lanes or self.salt_bytes < other.salt_bytes
                or self.hash_bytes < other.hash_bytes)


DEFAULT_PARAMS = Argon2Params()


@dataclass(frozen=True)
class StoredHash:
    """A parsed PHC string."""

    params: Argon2Params
    keyid: bytes | None
    salt: bytes
    digest: bytes


def derive_password_pepper(master_key: bytes) -> bytes:
    """The pepper for password hashes: its own label, so it never equals the API-key pepper."""
    return hmac.new(master_key, b"appliance/password-pepper/v1", hashlib.sha256).digest()


def pepper_keyid(pepper: bytes) -> bytes:
    """A short public name for a pepper, stored in each hash; reveals nothing about the pepper itself."""
    return hmac.new(pepper, b"appliance/password-pepper-id", hashlib.sha256).digest()[:_KEYID_BYTES]


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the stored password hash is malformed (bad base64)") from None
    if _b64encode(raw) != text:  # non-canonical trailing bits: not something we wrote
        raise ValueError("the stored password hash is malformed (non-canonical base64)")
    return raw


def _checked(value: int, name: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValueError(f"the stored password hash is malformed ({name}={value} is outside {low}..{high})")
    return value


def parse_hash(stored: str) -> StoredHash:
    """Parse a stored PHC string; ValueError (never the hash in its message) when it is not one we can verify."""
    match = _PHC.fullmatch(stored) if isinstance(stored, str) else None
    if match is None:
        raise ValueError("the stored password hash is not an argon2id PHC string; reset the user's password")
    version, memory, iterations, lanes, keyid, salt, digest = match.groups()
    if int(version) != ARGON2_VERSION:
        raise ValueError(f"the stored password hash uses Argon2 version {version}; only {ARGON2_VERSION} is supported")
    lanes_n = _checked(int(lanes), "p", 1, _MAX_LANES)
    salt_raw, digest_raw = _b64decode(salt), _b64decode(digest)
    params = Argon2Params(
        memory_kib=_checked(int(memory), "m", 8 * lanes_n, _MAX_MEMORY_KIB),
        iterations=_checked(int(iterations), "t", 1, _MAX_ITERATIONS),
        lanes=lanes_n,
        salt_bytes=_checked(len(salt_raw), "salt length", 8, 64),
        hash_bytes=_checked(len(digest_raw), "hash length", 16, 64))
    return StoredHash(params, _b64decode(keyid) if keyid else None, salt_raw, digest_raw)


def format_hash(parsed: StoredHash) -> str:
    p = parsed.params
    keyid = f",keyid={_b64encode(parsed.keyid)}" if parsed.keyid else ""
    return (f"$argon2id$v={ARGON2_VERSION}$m={p.memory_kib},t={p.iterations},p={p.lanes}{keyid}"
            f"${_b64encode(parsed.salt)}${_b64encode(parsed.digest)}")


def _normalise(password: str) -> bytes:
    # NFKC, as NIST SP 800-63B advises, so that the same passphrase typed on another keyboard still matches.
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _kdf(params: Argon2Params, salt: bytes, secret: bytes | None) -> Argon2id:
    return Argon2id(salt=salt, length=params.hash_bytes, iterations=params.iterations, lanes=params.lanes,
                    memory_cost=params.memory_kib, secret=secret)


class PasswordHasher:
    """Hashes with the current parameters and pepper; verifies hashes made with any earlier ones.

    `retired_peppers` keep hashes made before a master-key rotation verifiable until they are upgraded."""

    def __init__(self, params: Argon2Params = DEFAULT_PARAMS, pepper: bytes | None = None,
                 retired_peppers: Iterable[bytes] = ()) -> None:
        self.params = params
        self.pepper = pepper
        self.keyid = pepper_keyid(pepper) if pepper is not None else None
        self._peppers = {pepper_keyid(p): p for p in retired_peppers}
        if pepper is not None and self.keyid is not None:
            self._peppers[self.keyid] = pepper

    def hash(self, password: str) -> str:
        salt = secrets.token_bytes(self.params.salt_bytes)
        digest = _kdf(self.params, salt, self.pepper).derive(_normalise(password))
        return format_hash(StoredHash(self.params, self.keyid, salt, digest))

    def dummy_hash(self) -> str:
        """A well-formed hash with the current parameters that no password matches: verifying against it costs
        what a real verification costs (for unknown users, so that timing does not tell who exists)."""
        return format_hash(StoredHash(self.params, self.keyid, secrets.token_bytes(self.params.salt_bytes),
                                      secrets.token_bytes(self.params.hash_bytes)))

    def verify(self, password: str, stored: str) -> bool:
        """True when the password matches; False for a wrong password and for a hash that cannot be used."""
        try:
            parsed = parse_hash(stored)
        except ValueError:
            return False
        secret = None
        if parsed.keyid is not None:
            secret = self._peppers.get(parsed.keyid)
            if secret is None:  # made with a pepper this server no longer has
                return False
        try:
            _kdf(parsed.params, parsed.salt, secret).verify(_normalise(password), parsed.digest)
        except InvalidKey:
            return False
        return True

    def needs_rehash(self, stored: str) -> bool:
        """True when the hash is weaker than what `hash` makes now (parameters or pepper), or unreadable."""
        try:
            parsed = parse_hash(stored)
        except ValueError:
            return True
        return parsed.params.weaker_than(self.params) or parsed.keyid != self.keyid

    def verify_and_update(self, password: str, stored: str) -> tuple[bool, str | None]:
        """Verify; on success with an outdated hash, also return its replacement to store."""
        if not self.verify(password, stored):
            return False, None
        return True, self.hash(password) if self.needs_rehash(stored) else None


def check_password(password: str, username: str | None = None) -> None:
    """The password policy (NIST SP 800-63B style: length, not composition rules). InvalidRequest says why."""
    length = len(unicodedata.normalize("NFKC", password))
    if length < MIN_LENGTH:
        raise InvalidRequest(f"the password is too short ({length} characters); use at least {MIN_LENGTH}: "
                             "a few unrelated words make a good one", param="password", code="weak_password")
    if length > MAX_LENGTH:
        raise InvalidRequest(f"the password is too long ({length} characters); use at most {MAX_LENGTH}",
                             param="password", code="weak_password")
    if not password.strip():
        raise InvalidRequest("the password is only whitespace; choose one with words or characters in it",
                             param="password", code="weak_password")
    if username is not None and password.strip().casefold() == username.casefold():
        raise InvalidRequest("the password must not be the user name; choose something else", param="password",
                             code="weak_password")
