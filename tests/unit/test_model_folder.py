"""Hugging Face folders in the store: packed deterministically, checked for code and pickles, unpacked into tmpfs."""

from __future__ import annotations

import hashlib
import json
import stat
import tarfile
from pathlib import Path

import pytest

from appliance.errors import RegistryError
from appliance.registry.folder import check_folder, pack_folder, private_tmpfs_dir, unpack


def make_folder(root: Path, config: dict[str, object] | None = None) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    (root / "model.safetensors").write_bytes(b"\x01" * 1000)
    (root / "tokenizer.json").write_text("{}")
    return root


def packed(folder: Path) -> bytes:
    return b"".join(pack_folder(folder, check_folder(folder)))


def test_packing_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m")
    first = packed(folder)
    (folder / "model.safetensors").touch()  # a new mtime must not change the digest
    assert hashlib.sha256(packed(folder)).digest() == hashlib.sha256(first).digest()
    blob = tmp_path / "blob"
    blob.write_bytes(first)
    with private_tmpfs_dir(base=tmp_path) as target:
        assert stat.S_IMODE(target.stat().st_mode) == 0o700
        unpack(blob, target)
        assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
        assert (target / "model.safetensors").read_bytes() == b"\x01" * 1000
    assert not target.exists()


@pytest.mark.parametrize(("change", "words"), [
    (lambda f: (f / "pytorch_model.bin").write_bytes(b"x"), "pickle"),
    (lambda f: (f / "config.json").write_text('{"auto_map": {"AutoModel": "x.Model"}}'), "own Python code"),
    (lambda f: (f / "model.safetensors").unlink(), "no .safetensors"),
    (lambda f: (f / "link").symlink_to("/etc/passwd"), "symbolic link"),
])
def test_unsafe_or_incomplete_folders_are_refused(tmp_path: Path, change: object, words: str) -> None:
    folder = make_folder(tmp_path / "m")
    change(folder)  # type: ignore[operator]
    with pytest.raises(RegistryError, match=words):
        check_folder(folder)


def test_a_blob_with_a_path_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    blob = tmp_path / "evil.tar"
    with tarfile.open(blob, "w") as archive:
        member = tmp_path / "payload"
        member.write_text("x")
        archive.add(member, arcname="../escaped")
    with private_tmpfs_dir(base=tmp_path / ".") as target, pytest.raises(RegistryError, match="cannot be unpacked"):
        unpack(blob, target)
    assert not (tmp_path / "escaped").exists()
