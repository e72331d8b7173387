"""Password hashing (Argon2id in PHC strings), upgrades when parameters rise, damaged hashes, and the policy."""

from __future__ import annotations

import base64
import re

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from appliance.auth import passwords
from appliance.auth.passwords import (
    DEFAULT_PARAMS,
    Argon2Params,
    PasswordHasher,
    check_password,
    derive_password_pepper,
    parse_hash,
)
from appliance.errors import InvalidRequest

CHEAP = Argon2Params(memory_kib=64, iterations=1)  # for tests where the count of hashes matters, not their cost
PASSWORD = "correct horse battery staple"
B64 = "[A-Za-z0-9+/]+"
PHC = re.compile(rf"\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)(,keyid={B64})?\$({B64})\$({B64})")


def b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def test_defaults_are_at_least_owasp_and_round_trip() -> None:
    assert (DEFAULT_PARAMS.memory_kib, DEFAULT_PARAMS.iterations, DEFAULT_PARAMS.lanes) >= (19456, 2, 1)
    hasher = PasswordHasher()  # the real parameters, once
    stored = hasher.hash(PASSWORD)
    match = PHC.fullmatch(stored)
    assert match is not None, stored
    assert match.groups()[:4] == ("19456", "2", "1", None)
    assert len(b64(match.group(5))) == 16 and len(b64(match.group(6))) == 32
    assert "=" not in match.group(5) + match.group(6)  # unpadded, as the PHC string format says
    assert hasher.verify(PASSWORD, stored)
    assert not hasher.verify(PASSWORD + "!", stored)
    assert not hasher.needs_rehash(stored)


def test_unpeppered_hash_is_standard_argon2id() -> None:
    """Anyone with the PHC string and the password can check it with another Argon2 implementation."""
    stored = PasswordHasher(CHEAP).hash(PASSWORD)
    parsed = parse_hash(stored)
    expected = Argon2id(salt=parsed.salt, length=32, iterations=1, lanes=1, memory_cost=64).derive(PASSWORD.encode())
    assert parsed.digest == expected
    verify_phc = getattr(Argon2id, "verify_phc_encoded", None)  # cryptography >= 46 reads PHC strings itself
    if verify_phc is not None:
        verify_phc(PASSWORD.encode(), stored)  # raises InvalidKey on a mismatch


def test_wrong_passwords_fail() -> None:
    hasher = PasswordHasher(CHEAP)
    stored = hasher.hash(PASSWORD)
    for wrong in ("", "correct horse battery stapl", "Correct horse battery staple", PASSWORD + " ", "x" * 5000):
        assert not hasher.verify(wrong, stored), wrong


def test_same_password_gets_a_different_salt_each_time() -> None:
    hasher = PasswordHasher(CHEAP)
    first, second = hasher.hash(PASSWORD), hasher.hash(PASSWORD)
    assert first != second
    assert parse_hash(first).salt != parse_hash(second).salt
    assert hasher.verify(PASSWORD, first) and hasher.verify(PASSWORD, second)


def test_unicode_is_normalised() -> None:
    hasher = PasswordHasher(CHEAP)
    stored = hasher.hash("pa\u0301ssword with accent")  # a + combining acute
    assert hasher.verify("p\u00e1ssword with accent", stored)  # precomposed á


def test_weaker_hash_verifies_needs_rehash_and_is_upgraded() -> None:
    old = PasswordHasher(Argon2Params(memory_kib=1024, iterations=1)).hash(PASSWORD)
    current = PasswordHasher(Argon2Params(memory_kib=2048, iterations=2))
    assert current.verify(PASSWORD, old)
    assert current.needs_rehash(old)
    ok, upgraded = current.verify_and_update(PASSWORD, old)
    assert ok and upgraded is not None
    assert parse_hash(upgraded).params == current.params
    assert current.verify(PASSWORD, upgraded) and not current.needs_rehash(upgraded)
    assert current.verify_and_update(PASSWORD, upgraded) == (True, None)
    assert current.verify_and_update("wrong password!!", old) == (False, None)


def test_stronger_hash_is_kept() -> None:
    stronger = PasswordHasher(Argon2Params(memory_kib=128, iterations=3)).hash(PASSWORD)
    assert not PasswordHasher(CHEAP).needs_rehash(stronger)


def test_pepper_is_recorded_and_required() -> None:
    pepper = derive_password_pepper(b"k" * 32)
    assert pepper != derive_password_pepper(b"j" * 32)
    peppered = PasswordHasher(CHEAP, pepper)
    stored = peppered.hash(PASSWORD)
    assert ",keyid=" in stored
    assert peppered.verify(PASSWORD, stored)
    assert not PasswordHasher(CHEAP).verify(PASSWORD, stored)  # no pepper
    assert not PasswordHasher(CHEAP, derive_password_pepper(b"j" * 32)).verify(PASSWORD, stored)  # another one
    # a hash made before there was a pepper still verifies, and is upgraded to a peppered one
    plain = PasswordHasher(CHEAP).hash(PASSWORD)
    ok, upgraded = peppered.verify_and_update(PASSWORD, plain)
    assert ok and upgraded is not None and ",keyid=" in upgraded
    # after a master-key rotation the old pepper, kept as retired, still verifies and the hash is upgraded
    rotated = PasswordHasher(CHEAP, derive_password_pepper(b"j" * 32), retired_peppers=[pepper])
    assert rotated.verify(PASSWORD, stored) and rotated.needs_rehash(stored)


def tampered(stored: str) -> dict[str, str]:
    head, salt, digest = stored.rsplit("$", 2)
    return {
        "empty": "",
        "not phc": "hunter2",
        "bcrypt": "$2b$12$abcdefghijklmnopqrstuu5J5t8f6Z8yQ2Q3zZ7k1Q4d1b1G8xJ2",
        "argon2i": stored.replace("$argon2id$", "$argon2i$"),
        "version 16": stored.replace("v=19", "v=16"),
        "bad base64 length": f"{head}${salt}$AA{digest}",  # 45 characters: no byte string encodes to that
        "padding": f"{head}${salt}=${digest}",
        "non-canonical base64": f"{head}${salt}${digest[:-1]}{chr(ord(digest[-1]) + 1)}",
        "url-safe alphabet": f"{head}${salt}${digest[:-1]}_",
        "missing field": f"{head}${digest}",
        "huge memory": stored.replace("m=64,", "m=99999999999,"),
        "memory above the cap": stored.replace("m=64,", "m=4194304,"),  # 4 GiB: a planted row must not OOM us
        "zero iterations": stored.replace("t=1,", "t=0,"),
        "zero lanes": stored.replace("p=1", "p=0"),
        "short salt": f"{head}$AAAA${digest}",
        "digest flipped": f"{head}${salt}${'B' if digest[0] != 'B' else 'C'}{digest[1:]}",
        "trailing newline": stored + "\n",
        "non-ascii digits": stored.replace("m=64", "m=\uff16\uff14"),  # fullwidth 6 and 4
    }


def test_tampered_hashes_are_refused_cleanly() -> None:
    hasher = PasswordHasher(CHEAP)
    stored = hasher.hash(PASSWORD)
    for what, bad in tampered(stored).items():
        assert not hasher.verify(PASSWORD, bad), what
        assert hasher.verify_and_update(PASSWORD, bad) == (False, None), what
        if what != "digest flipped":  # well-formed, just wrong; every other one is unreadable
            assert hasher.needs_rehash(bad), what
            with pytest.raises(ValueError, match="stored password hash") as info:
                parse_hash(bad)
            assert stored.rsplit("$", 1)[1] not in str(info.value), what  # the message never repeats the hash
    assert hasher.verify(PASSWORD, stored)


def test_dummy_hash_matches_nothing_and_costs_a_real_verification() -> None:
    hasher = PasswordHasher(CHEAP)
    dummy = hasher.dummy_hash()
    assert parse_hash(dummy).params == CHEAP
    assert not hasher.verify(PASSWORD, dummy)
    assert not hasher.needs_rehash(dummy)


@pytest.mark.parametrize(("password", "username", "says"), [
    ("", None, "too short"),
    ("elevenchars", None, "at least 12"),
    ("x" * 1025, None, "at most 1024"),
    (" " * 12, None, "only whitespace"),
    ("\t \n" * 5, None, "only whitespace"),
    ("alice@example.com", "Alice@Example.com", "must not be the user name"),
])
def test_policy_refuses_with_a_clear_message(password: str, username: str | None, says: str) -> None:
    with pytest.raises(InvalidRequest, match=says) as info:
        check_password(password, username)
    assert info.value.param == "password"
    if password.strip():
        assert password not in info.value.message


def test_policy_accepts_long_passphrases() -> None:
    check_password("x" * 12)
    check_password("x" * passwords.MAX_LENGTH, "alice")
    check_password("  spaces inside count  ", "alice")
    check_password("alice-but-longer-than-that", "alice")
