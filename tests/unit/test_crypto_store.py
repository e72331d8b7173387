"""The encrypted model store and its key ring on real files: keys at 0600, weights only as ciphertext on disk,
decryption into a sealed memfd, wrong key version / wrong model id / damage refused, plaintext migration and
rotation that rewraps without touching the weights."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.crypto.envelope import Envelope, unwrap
from appliance.crypto.keyring import KeyRing, KeyRingError
from appliance.crypto.streaming import MAGIC, MIB, IntegrityError, StreamHeader
from appliance.datadir import DataDir
from appliance.registry.store import ModelDamaged, ModelStore, is_tmpfs

KAT_HEADER = StreamHeader(MIB, bytes(range(100, 132)), bytes.fromhex("a0a1a2a3a4a5a6")).encode()
KAT_MODEL_ID = "ab" * 32
KAT_KEK = bytes([0x42]) * 32
KAT_ENVELOPE = ("41504c575241500100000001000102030405060708090a0b05df93deb529f40c950f4e18ddd05534228cdc79b45cf4fe0b80"
                "3a3c8609a3e0006629e5ea0433b93e4aa84bea20eeed")
PAYLOAD = b"GGUF" + os.urandom(MIB + 4099)  # two segments


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def store(data: DataDir) -> ModelStore:
    return ModelStore(data.models, data.tmp, KeyRing(data.keys), data.wrapped_keys)


def put(store: ModelStore, payload: bytes = PAYLOAD) -> str:
    blob = store.put(iter([payload[:1000], payload[1000:]]))
    assert blob.sha256 == hashlib.sha256(payload).hexdigest() and blob.size_bytes == len(payload)
    return blob.sha256


def loads(store: ModelStore, sha256: str, payload: bytes = PAYLOAD) -> bool:
    with store.open_for_load(sha256) as weights:
        return weights.path.read_bytes() == payload


def test_envelope_known_answer(tmp_path: Path) -> None:
    (tmp_path / "kek-000001.key").write_bytes(KAT_KEK)
    envelope = Envelope.decode(bytes.fromhex(KAT_ENVELOPE))
    assert envelope.key_version == 1
    assert unwrap(KeyRing(tmp_path), envelope, KAT_HEADER, KAT_MODEL_ID) == bytes(range(32))
    with pytest.raises(IntegrityError):
        unwrap(KeyRing(tmp_path), envelope, KAT_HEADER, "cd" * 32)


def test_key_ring_files_are_private_and_versioned(data: DataDir) -> None:
    ring = KeyRing(data.keys)
    assert ring.versions() == []
    assert ring.active_version() == 1
    assert ring.create_version() == 2
    assert ring.versions() == [1, 2] and ring.active_version() == 2
    for version in (1, 2):
        path = data.keys / f"kek-{version:06d}.key"
        assert mode(path) == 0o600 and len(path.read_bytes()) == 32
    assert KeyRing(data.keys).key(1) == ring.key(1) != ring.key(2)
    assert data.read_master_key() != ring.key(1)  # the peppers' master key is a separate, unchanged file
    with pytest.raises(KeyRingError, match="active one"):
        ring.retire(2)
    ring.retire(1)
    with pytest.raises(KeyRingError, match="key version 1 is not in"):
        KeyRing(data.keys).key(1)


def test_passphrase_key_ring(data: DataDir) -> None:
    ring = KeyRing(data.keys, "passphrase", passphrase=lambda: "correct horse battery staple")
    version, key = ring.active()
    path = data.keys / f"kek-{version:06d}.argon2"
    assert mode(path) == 0o600 and b"correct horse" not in path.read_bytes()
    again = KeyRing(data.keys, "passphrase", passphrase=lambda: "correct horse battery staple")
    assert again.key(version) == key
    with pytest.raises(KeyRingError, match="passphrase does not open key version 1"):
        KeyRing(data.keys, "passphrase", passphrase=lambda: "wrong").key(version)


def test_passphrase_from_the_environment(data: DataDir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_MASTER_PASSPHRASE", "from-env-passphrase")
    store = ModelStore(data.models, data.tmp, KeyRing(data.keys, "passphrase"), data.wrapped_keys)
    sha256 = put(store)
    assert loads(ModelStore(data.models, data.tmp, KeyRing(data.keys, "passphrase"), data.wrapped_keys), sha256)
    monkeypatch.setenv("APPLIANCE_MASTER_PASSPHRASE", "another")
    with pytest.raises(KeyRingError, match="passphrase does not open"):
        loads(ModelStore(data.models, data.tmp, KeyRing(data.keys, "passphrase"), data.wrapped_keys), sha256)


def test_only_ciphertext_reaches_the_disk(store: ModelStore, data: DataDir) -> None:
    marker = PAYLOAD[5000:5064]

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(PAYLOAD), 100_000):
            yield PAYLOAD[start : start + 100_000]
            for file in data.tmp.iterdir():  # what the staging file holds while the import runs
                assert marker not in file.read_bytes()

    sha256 = store.put(chunks()).sha256
    blob = data.models / f"sha256-{sha256}"
    assert blob.read_bytes().startswith(MAGIC) and marker not in blob.read_bytes()
    assert mode(data.wrapped_keys / f"sha256-{sha256}.key") == 0o600
    assert list(data.tmp.iterdir()) == []
    assert loads(store, sha256)


def test_memfd_is_sealed_inherited_by_number_and_wiped(store: ModelStore) -> None:
    sha256 = put(store)
    with store.open_for_load(sha256) as weights:
        [fd] = weights.fds
        assert weights.path == Path(f"/proc/self/fd/{fd}")
        assert os.readlink(weights.path).startswith("/memfd:appliance-model-")
        assert os.fstat(fd).st_size == len(PAYLOAD)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)  # sealed: not even the worker may change the weights
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.skipif(not is_tmpfs(Path("/dev/shm")), reason="no tmpfs at /dev/shm")
def test_tmpfs_folder_is_private_and_removed(store: ModelStore) -> None:
    sha256 = put(store)
    with store.open_for_load(sha256, "tmpfs") as weights:
        folder = weights.path
        assert mode(folder) == 0o700 and is_tmpfs(folder)
        assert (folder / "model").read_bytes() == PAYLOAD
    assert not folder.exists()


def test_tmpfs_mode_refuses_a_disk_folder(data: DataDir, tmp_path: Path) -> None:
    store = ModelStore(data.models, data.tmp, KeyRing(data.keys), data.wrapped_keys, tmpfs=tmp_path)
    sha256 = put(store)
    if is_tmpfs(tmp_path):
        pytest.skip("the test's temp dir is itself a tmpfs")
    with pytest.raises(Exception, match="not a tmpfs"), store.open_for_load(sha256, "tmpfs"):
        pass


def test_damaged_blob_fails_to_load_and_verify_names_it(store: ModelStore, data: DataDir) -> None:
    good, bad = put(store), put(store, b"GGUF other model")
    assert store.problem(good) is None and store.problem(bad) is None
    blob = data.models / f"sha256-{good}"
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 1
    blob.write_bytes(bytes(raw))
    with pytest.raises(ModelDamaged, match="failed its integrity check: segment 0 of 2 failed authentication"):
        loads(store, good)
    assert "segment 0 of 2" in (store.problem(good) or "")
    assert store.problem(bad) is None


def test_wrong_key_version_is_refused(store: ModelStore, data: DataDir) -> None:
    sha256 = put(store)
    store.ring.create_version()
    env_path = data.wrapped_keys / f"sha256-{sha256}.key"
    original = Envelope.decode(env_path.read_bytes())
    env_path.write_bytes(Envelope(2, original.nonce, original.wrapped).encode())
    with pytest.raises(ModelDamaged, match="does not open under key version 2"):
        loads(store, sha256)
    env_path.write_bytes(Envelope(99, original.nonce, original.wrapped).encode())
    with pytest.raises(KeyRingError, match="key version 99 is not in"):
        loads(store, sha256)
    assert "key version 99" in (store.problem(sha256) or "")
    env_path.write_bytes(original.encode())
    assert loads(store, sha256)


def test_wrong_model_id_is_refused(store: ModelStore, data: DataDir) -> None:
    """A blob and its wrapped key moved under another model's name do not open."""
    sha256 = put(store)
    other = "0" * 64
    (data.models / f"sha256-{sha256}").rename(data.models / f"sha256-{other}")
    (data.wrapped_keys / f"sha256-{sha256}.key").rename(data.wrapped_keys / f"sha256-{other}.key")
    with pytest.raises(ModelDamaged, match="model id was changed"):
        loads(store, other)


def test_missing_wrapped_key_is_reported(store: ModelStore, data: DataDir) -> None:
    sha256 = put(store)
    (data.wrapped_keys / f"sha256-{sha256}.key").unlink()
    assert "wrapped data key" in (store.problem(sha256) or "")


def test_plaintext_blobs_of_an_earlier_version_are_encrypted(store: ModelStore, data: DataDir) -> None:
    sha256 = hashlib.sha256(PAYLOAD).hexdigest()
    legacy = data.models / f"sha256-{sha256}"
    legacy.write_bytes(PAYLOAD)
    mislabelled = data.models / f"sha256-{'1' * 64}"
    mislabelled.write_bytes(b"GGUF not what the name says")
    assert "not encrypted" in (store.problem(sha256) or "")
    assert store.migrate_plaintext() == [sha256]
    assert legacy.read_bytes().startswith(MAGIC) and PAYLOAD[100:200] not in legacy.read_bytes()
    assert loads(store, sha256) and store.problem(sha256) is None
    assert mislabelled.read_bytes() == b"GGUF not what the name says"  # left for `models verify` to report
    assert store.problem("1" * 64) is not None
    assert store.migrate_plaintext() == []


def test_rotation_rewraps_without_touching_the_weights(store: ModelStore, data: DataDir) -> None:
    digests = [put(store), put(store, b"GGUF second")]
    blobs = {d: (data.models / f"sha256-{d}").read_bytes() for d in digests}
    assert set(store.key_versions_in_use().values()) == {1}
    new = store.ring.create_version()
    report = store.rewrap_all()
    assert sorted(report.rewrapped) == sorted(digests) and not report.failed
    assert set(store.key_versions_in_use().values()) == {new}
    assert {d: (data.models / f"sha256-{d}").read_bytes() for d in digests} == blobs
    store.ring.retire(1)
    fresh = ModelStore(data.models, data.tmp, KeyRing(data.keys), data.wrapped_keys)
    assert loads(fresh, digests[0]) and loads(fresh, digests[1], b"GGUF second")
    assert store.rewrap_all().current == sorted(digests)


def test_delete_removes_blob_and_wrapped_key(store: ModelStore, data: DataDir) -> None:
    sha256 = put(store)
    store.delete(sha256)
    assert list(data.models.iterdir()) == [] and list(data.wrapped_keys.iterdir()) == []
