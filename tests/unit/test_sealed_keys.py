"""The key ring sealed with a passphrase for backups (appliance.crypto.sealed): it opens with the passphrase and
gives back every file, and refuses a wrong passphrase, a changed cost or salt, a damaged box and crafted paths."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.crypto.keyring import derive_key
from appliance.crypto.sealed import SealError, open_sealed, seal_folder, structure_problems

PASSPHRASE = "a passphrase of several words"


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], bytes]:
    """A key folder's files and their sealed box (sealed once: Argon2id costs 64 MiB and a fraction of a second)."""
    folder = tmp_path_factory.mktemp("keys")
    files = {"kek-000001.key": os.urandom(32), "kek-000002.key": os.urandom(32),
             "wrapped/sha256-ab.key": os.urandom(72)}
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return files, seal_folder(folder, PASSPHRASE)


def test_sealed_ring_opens_with_its_passphrase_only(sealed: tuple[dict[str, bytes], bytes]) -> None:
    files, raw = sealed
    assert structure_problems(raw) == []
    assert not any(content in raw or base64.b64encode(content) in raw for content in files.values())
    assert open_sealed(raw, PASSPHRASE) == files
    with pytest.raises(SealError, match="passphrase does not open"):
        open_sealed(raw, PASSPHRASE + " ")


@pytest.mark.parametrize(("field", "value"), [("iterations", 1), ("salt", "00" * 16), ("nonce", "00" * 12)])
def test_a_changed_parameter_fails_like_a_wrong_passphrase(sealed: tuple[dict[str, bytes], bytes], field: str,
                                                            value: object) -> None:
    box = json.loads(sealed[1])
    if field == "nonce":
        box["nonce"] = value
    else:
        box["kdf"][field] = value
    with pytest.raises(SealError, match="does not open"):
        open_sealed(json.dumps(box).encode(), PASSPHRASE)


@pytest.mark.parametrize(("change", "says"), [
    (lambda box: box.update(format="x"), "not a sealed key ring"),
    (lambda box: box["kdf"].update(name="pbkdf2"), "not argon2id"),
    (lambda box: box["kdf"].update(memory_cost=1 << 30), "out of range"),
    (lambda box: box.update(nonce="00"), "nonce has the wrong length"),
    (lambda box: box.update(ciphertext="!!"), "not encoded"),
    (lambda box: box["kdf"].pop("salt"), "incomplete"),
])
def test_structure_is_checked_without_the_passphrase(sealed: tuple[dict[str, bytes], bytes], change: object,
                                                     says: str) -> None:
    box = json.loads(sealed[1])
    change(box)  # type: ignore[operator]
    raw = json.dumps(box).encode()
    assert any(says in problem for problem in structure_problems(raw)), structure_problems(raw)
    with pytest.raises(SealError, match=says):  # refused before any key is derived (no memory bomb)
        open_sealed(raw, PASSPHRASE)
    assert structure_problems(b"\x00garbage") != []


def test_a_crafted_path_is_refused(sealed: tuple[dict[str, bytes], bytes]) -> None:
    box = json.loads(sealed[1])
    key = derive_key(PASSPHRASE, box["kdf"])
    aad = json.dumps({k: v for k, v in box.items() if k != "ciphertext"}, sort_keys=True).encode()
    plain = json.dumps({"../../etc/cron.d/x": base64.b64encode(b"*").decode()}).encode()
    box["ciphertext"] = base64.b64encode(AESGCM(key).encrypt(bytes.fromhex(box["nonce"]), plain, aad)).decode()
    with pytest.raises(SealError, match="unsafe path"):
        open_sealed(json.dumps(box).encode(), PASSPHRASE)


def test_short_passphrases_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SealError, match="at least 8"):
        seal_folder(tmp_path, "short")
