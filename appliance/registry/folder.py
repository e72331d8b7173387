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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import RegistryError
from appliance.registry.sources import PICKLE_SUFFIXES

if TYPE_CHECKING:
    from appliance.registry.store import ModelStore

CHUNK = 1 << 20
TMPFS = Path("/dev/shm")  # noqa: S108 - RAM-backed on Linux; what is made in it is 0700
_BLOCK = tarfile.BLOCKSIZE


def refuse_unsafe_folder(files: Sequence[str], config: Mapping[str, Any], *, allow_remote_code: bool,
                         stored_whole: bool) -> None:
    """The one safety check of a Hugging Face model folder, whether it lies on disk (`file:`, stored whole) or is
    listed on the hub (`hf:`, where only its GGUF file is taken): no code of its authors' (`auto_map`,
    `trust_remote_code`, `.py` files) unless allowed; no pickle-based weights; a stored folder holds safetensors
    weights and nothing pickled at all. `files` are the folder's relative paths."""
    code = [f for f in files if f.endswith(".py")]
    asks_for_code = "auto_map" in config or bool(config.get("trust_remote_code"))
    if (asks_for_code or code) and not allow_remote_code:
        what = "its config asks for trust_remote_code/auto_map" if asks_for_code else f"it ships code ({code[0]})"
        raise RegistryError(f"the folder would run its authors' own Python code when loaded: {what}; refused (set "
                            "models.allow_remote_code = true only for code you have reviewed)", code="remote_code")
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    if stored_whole and pickles:
        raise RegistryError(f"{pickles[0]} is a pickle-based weights file, which can run code when loaded; convert "
                            "it to safetensors first", code="unsafe_model")
    if not has_safetensors and (stored_whole or pickles):
        what = "are pickle-based (.bin/.pt) and can run code when loaded" if pickles else "are missing"
        raise RegistryError(f"the folder's weights {what}: it holds no .safetensors weights; refused (use a folder "
                            "or repository with .safetensors or .gguf files)", code="unsupported_format")


def check_folder(folder: Path, *, allow_remote_code: bool = False) -> list[Path]:
    """The files (relative, sorted) of a folder on disk once it is safe to store and serve: no links, and
    `refuse_unsafe_folder`'s rules."""
    if not (folder / "config.json").is_file():
        raise RegistryError(f"{folder} is not a Hugging Face model folder (no config.json)", code="unsupported_format")
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_symlink():
            raise RegistryError(f"{rel} in {folder} is a symbolic link; copy the real file in", code="unsafe_model")
        if not path.is_dir():
            files.append(rel)
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError:
        raise RegistryError(f"{folder}/config.json is not JSON", code="unsupported_format") from None
    refuse_unsafe_folder([f.as_posix() for f in files], config if isinstance(config, dict) else {},
                         allow_remote_code=allow_remote_code, stored_whole=True)
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
