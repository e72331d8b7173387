"""Content-addressed model blobs. Everything that writes or reads weights goes through `ModelStore`,
so that encryption at rest changes this module only."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import RegistryError

CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size_bytes: int


class ModelStore:
    def __init__(self, root: Path, staging: Path) -> None:
        self.root = root
        self.staging = staging

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise RegistryError(f"{sha256!r} is not a sha256 digest")
        return self.root / f"sha256-{sha256}"

    def put(
        self,
        chunks: Iterable[bytes],
        expected_sha256: str | None = None,
        check_head: Callable[[bytes], None] | None = None,
    ) -> StoredBlob:
        """Write a stream to a staging file, verify it, then move it into place atomically.

        On any failure nothing is left behind and an existing blob is untouched."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = _mkstemp(self.staging)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    if size == 0 and check_head is not None:
                        check_head(chunk)
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                if size == 0 and check_head is not None:
                    check_head(b"")
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if expected_sha256 and actual != expected_sha256.lower():
                raise RegistryError(
                    f"downloaded file has sha256 {actual}, expected {expected_sha256}; the source changed or "
                    "the download was damaged, nothing was stored",
                    code="digest_mismatch",
                )
            # replace even an existing blob: it may be the damaged copy that this pull repairs
            tmp.replace(self._path(actual))
            return StoredBlob(actual, size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def open_for_load(self, sha256: str) -> Iterator[Path]:
        """A path an engine can load the weights from, valid inside the `with` block."""
        path = self._path(sha256)
        if not path.is_file():
            raise RegistryError(f"model blob {sha256} is missing from {self.root}; pull the model again")
        yield path

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def verify(self, sha256: str) -> bool:
        path = self._path(sha256)
        if not path.is_file():
            return False
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest() == sha256


def _mkstemp(directory: Path) -> tuple[int, str]:
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=directory, prefix="incoming-")
