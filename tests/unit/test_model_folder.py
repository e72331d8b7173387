"""Hugging Face folders in the store: packed deterministically, checked for code and pickles, unpacked into tmpfs."""

from __future__ import annotations

import hashlib
import json
import stat
import tarfile
from pathlib import Path

import pytest

from appliance.errors import RegistryError
from appliance.registry.folder import check_folder, pack_folder, private_tmpfs_dir, refuse_unsafe_folder, unpack


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


@pytest.mark.parametrize(("extra", "config", "code"), [
    ("modeling_x.py", {}, "remote_code"),
    ("", {"auto_map": {"AutoModel": "x.Model"}}, "remote_code"),
    ("", {"trust_remote_code": True}, "remote_code"),
    ("", {"model_type": "llama"}, None),
])
def test_a_folder_on_disk_and_a_hub_listing_get_the_same_check(tmp_path: Path, extra: str,
                                                               config: dict[str, object], code: str | None) -> None:
    """One check for `file:` folders and `hf:` repositories: the same folder is refused (or not) for the same
    reason either way, and models.allow_remote_code lets reviewed code through both ways."""
    folder = make_folder(tmp_path / "m", config)
    if extra:
        (folder / extra).write_text("import os\n")
    listing = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    outcomes = []
    for judge in (lambda: check_folder(folder),
                  lambda: refuse_unsafe_folder(listing, config, allow_remote_code=False, stored_whole=False)):
        try:
            judge()
        except RegistryError as exc:
            outcomes.append((exc.code, exc.message))
        else:
            outcomes.append((None, ""))
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == code, outcomes
    assert check_folder(folder, allow_remote_code=True)  # allowed: both ways
    refuse_unsafe_folder(listing, config, allow_remote_code=True, stored_whole=False)


def test_a_blob_with_a_path_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    blob = tmp_path / "evil.tar"
    with tarfile.open(blob, "w") as archive:
        member = tmp_path / "payload"
        member.write_text("x")
        archive.add(member, arcname="../escaped")
    with private_tmpfs_dir(base=tmp_path / ".") as target, pytest.raises(RegistryError, match="cannot be unpacked"):
        unpack(blob, target)
    assert not (tmp_path / "escaped").exists()
