"""Hugging Face model folders in the store: packed as one deterministic tar blob (so a folder is content-addressed
and encrypted like any model file), and unpacked for loading only into a private tmpfs directory (0700, in RAM),
removed when the engine is done with it. Plaintext weights never land on persistent disk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import RegistryError
from appliance.registry.sources import PICKLE_SUFFIXES

if TYPE_CHECKING:
    from appliance.registry.store import ModelStore

CHUNK = 1 << 20
TMPFS = Path("/dev/shm")  # noqa: S108 - RAM-backed on Linux; what is made in it is 0700
_BLOCK = tarfile.BLOCKSIZE


def check_folder(folder: Path, *, allow_remote_code: bool = False) -> list[Path]:
    """The folder's files (relative, sorted) once it is safe to serve: safetensors weights only (no pickle), no
    links, and no custom code (`auto_map`) unless allowed."""
    if not (folder / "config.json").is_file():
        raise RegistryError(f"{folder} is not a Hugging Face model folder (no config.json)", code="unsupported_format")
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_symlink():
            raise RegistryError(f"{rel} in {folder} is a symbolic link; copy the real file in", code="unsafe_model")
        if path.is_dir():
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise RegistryError(f"{rel} is a pickle-based weights file, which can run code when loaded; convert it "
                                "to safetensors first", code="unsafe_model")
        files.append(rel)
    if not any(f.suffix == ".safetensors" for f in files):
        raise RegistryError(f"{folder} holds no .safetensors weights", code="unsupported_format")
    config = json.loads((folder / "config.json").read_text())
    if not allow_remote_code and ("auto_map" in config or config.get("trust_remote_code")):
        raise RegistryError(f"{folder} asks to run its own Python code (auto_map); such folders are refused",
                            code="unsafe_model")
    return files


def pack_folder(folder: Path, files: list[Path]) -> Iterator[bytes]:
    """A tar stream of `files` with fixed owners, modes and times, so the same folder gives the same digest."""
    for rel in files:
        path = folder / rel
        info = tarfile.TarInfo(rel.as_posix())
        info.size, info.mode, info.mtime = path.stat().st_size, 0o600, 0
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        if pad := -info.size % _BLOCK:
            yield b"\0" * pad
    yield b"\0" * (2 * _BLOCK)


@contextlib.contextmanager
def private_tmpfs_dir(prefix: str = "appliance-", base: Path = TMPFS) -> Iterator[Path]:
    """A fresh 0700 directory in RAM (tmpfs), its files truncated and removed on exit whatever happens inside."""
    if not base.is_dir() or not os.access(base, os.W_OK):
        raise RegistryError(f"no writable tmpfs at {base} to unpack a model folder into; mount one",
                            code="no_tmpfs")
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))  # mkdtemp makes it 0700
    try:
        yield path
    finally:
        for file in path.rglob("*"):
            if file.is_file() and not file.is_symlink():
                with contextlib.suppress(OSError):
                    os.truncate(file, 0)  # frees the pages now, even if a process still holds the file open
        shutil.rmtree(path, ignore_errors=True)


def unpack(blob: Path, target: Path) -> None:
    """Unpack the folder packed in `blob` (a readable path, e.g. the store's memfd) into `target`."""
    try:
        with tarfile.open(blob, mode="r:") as archive:
            archive.extractall(target, filter="data")  # refuses absolute names, '..', links out and devices
    except (tarfile.TarError, OSError) as exc:
        raise RegistryError(f"the stored model folder cannot be unpacked ({exc}); run `appliance models verify` "
                            "and pull or convert it again", code="model_damaged") from exc


@contextlib.contextmanager
def unpacked_from_store(store: ModelStore, sha256: str) -> Iterator[Path]:
    """The folder model `sha256`, decrypted and unpacked into private tmpfs for an engine that loads directories;
    the decrypted blob is dropped once unpacked, the folder when the block ends."""
    with private_tmpfs_dir("appliance-model-", store.tmpfs) as target:
        with store.open_for_load(sha256, "memfd") as weights:
            unpack(weights.path, target)
        yield target
