"""Content-addressed, encrypted model blobs. Everything that writes or reads weights goes through `ModelStore`.

Layout: `models/sha256-<digest of the plaintext>` is the weights in the segmented AEAD format of
`appliance.crypto.streaming`; `keys/wrapped/sha256-<digest>.key` is its data key wrapped under a version of the
key ring (`appliance.crypto.envelope`). Weights are decrypted only into memory: a sealed memfd whose
`/proc/self/fd/N` path the worker inherits, or a 0700 folder on tmpfs for engines that need a directory;
both are wiped when the model is unloaded. Plaintext blobs left by earlier versions are encrypted in place by
`migrate_plaintext` (at server start and by `appliance models verify --repair`)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from appliance.config import CryptoSettings
from appliance.crypto.envelope import Envelope, new_data_key, rewrap, unwrap, wrap
from appliance.crypto.files import atomic_write, crash_point, fsync_dir, remove_stale_temps
from appliance.crypto.keyring import KeyRing, KeyRingError
from appliance.crypto.streaming import (
    DEFAULT_SEGMENT,
    HEADER_LEN,
    MAGIC,
    MIB,
    IntegrityError,
    StreamEncryptor,
    StreamHeader,
    decrypt_segments,
    read_header,
)
from appliance.datadir import DataDir
from appliance.errors import ModelUnavailable, RegistryError
from appliance.logs import get_logger
from appliance.registry.gguf_check import GgufInfo, read_gguf_stream
from appliance.storage import full_disk_is

log = get_logger(__name__)
CHUNK = 1 << 20
MODEL_STORE = "the model store"
STAGING_PREFIX = "incoming-"
DEFAULT_TMPFS = Path("/dev/shm")  # noqa: S108 (a private 0700 folder is made in it, checked to be tmpfs)


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class LoadableWeights:
    """Plaintext weights in memory: `path` opens them, in this process and in a child that inherits `fds`."""

    path: Path
    fds: tuple[int, ...] = ()


@dataclass
class RotationReport:
    rewrapped: list[str] = field(default_factory=list)
    current: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class ModelDamaged(ModelUnavailable):
    code = "model_damaged"


class ModelStore:
    def __init__(self, root: Path, staging: Path, ring: KeyRing, wrapped: Path | None = None, *,
                 segment_size: int = DEFAULT_SEGMENT, tmpfs: Path = DEFAULT_TMPFS) -> None:
        self.root = root
        self.staging = staging
        self.ring = ring
        self.wrapped = wrapped or ring.directory / "wrapped"
        self.segment_size = segment_size
        self.tmpfs = tmpfs

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise RegistryError(f"{sha256!r} is not a sha256 digest")
        return self.root / f"sha256-{sha256}"

    def _envelope_path(self, sha256: str) -> Path:
        return self.wrapped / f"{self._path(sha256).name}.key"

    def put(
        self,
        chunks: Iterable[bytes],
        expected_sha256: str | None = None,
        check_head: Callable[[bytes], None] | None = None,
    ) -> StoredBlob:
        """Encrypt a stream into a staging file, verify its digest, then move blob and wrapped key into place.

        Only ciphertext touches the disk. On any failure nothing is left behind and an existing blob is untouched."""
        self.ring.active()  # no key (e.g. no passphrase): fail before fetching anything
        with full_disk_is(MODEL_STORE, self.staging, hint="the import left nothing behind"):
            return self._put(chunks, expected_sha256, check_head)

    def _put(self, chunks: Iterable[bytes], expected_sha256: str | None,
             check_head: Callable[[bytes], None] | None) -> StoredBlob:
        digest = hashlib.sha256()
        size = 0
        data_key = new_data_key()
        encryptor = StreamEncryptor(data_key, StreamHeader.fresh(self.segment_size))
        fd, tmp_name = _mkstemp(self.staging)
        lock = os.dup(fd)  # keeps the staging lock until the blob is installed (closing `out` alone would drop it)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(encryptor.start())
                for chunk in chunks:
                    if size == 0 and check_head is not None:
                        check_head(chunk)
                    digest.update(chunk)
                    for sealed in encryptor.update(chunk):
                        out.write(sealed)
                    size += len(chunk)
                if size == 0 and check_head is not None:
                    check_head(b"")
                out.write(encryptor.finish())
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if expected_sha256 and actual != expected_sha256.lower():
                raise RegistryError(
                    f"downloaded file has sha256 {actual}, expected {expected_sha256}; the source changed or "
                    "the download was damaged, nothing was stored",
                    code="digest_mismatch",
                )
            self._install(tmp, encryptor.header.encode(), data_key, actual)
            return StoredBlob(actual, size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(lock)

    def _install(self, staged: Path, header: bytes, data_key: bytes, sha256: str) -> None:
        """Wrapped key first, then the blob: a crash in between leaves a pair that fails closed until pulled again
        (replacing even an existing blob: it may be the damaged copy that this pull repairs)."""
        self.wrapped.mkdir(mode=0o700, parents=True, exist_ok=True)
        envelope = wrap(self.ring, data_key, header, sha256)
        atomic_write(self._envelope_path(sha256), envelope.encode())
        staged.replace(self._path(sha256))
        fsync_dir(self.root)

    def _open_key(self, sha256: str, fh: BinaryIO) -> tuple[StreamHeader, bytes]:
        """Read the header of an open blob and unwrap its data key."""
        head = fh.read(HEADER_LEN)
        fh.seek(0)
        if not head.startswith(MAGIC):
            if head.startswith(b"GGUF"):
                raise IntegrityError("the blob is not encrypted (a plaintext file from an earlier version or put "
                                     "there by hand); `appliance models verify --repair` encrypts it")
            raise IntegrityError("the blob is not an encrypted model file")
        header, raw = read_header(fh)
        env_path = self._envelope_path(sha256)
        if not env_path.is_file():
            raise IntegrityError(f"its wrapped data key {env_path} is missing")
        return header, unwrap(self.ring, Envelope.decode(env_path.read_bytes()), raw, sha256)

    def _plaintext(self, sha256: str) -> Iterator[bytes]:
        path = self._path(sha256)
        if not path.is_file():
            raise RegistryError(f"model blob {sha256} is missing from {self.root}; pull the model again")
        with path.open("rb") as fh:
            header, data_key = self._open_key(sha256, fh)
            fh.seek(HEADER_LEN)
            yield from decrypt_segments(data_key, header, fh, os.fstat(fh.fileno()).st_size - HEADER_LEN)

    def gguf_header(self, sha256: str, size_bytes: int) -> GgufInfo:
        """The validated header of a stored GGUF of `size_bytes` (plaintext) bytes, decrypted in memory: only the
        segments the header spans are read. Raises RegistryError (InvalidGguf) when it is not a valid GGUF."""
        return read_gguf_stream(self._plaintext(sha256), size_bytes)

    @contextlib.contextmanager
    def open_for_load(self, sha256: str, into: Literal["memfd", "tmpfs"] = "memfd") -> Iterator[LoadableWeights]:
        """Decrypt the weights into memory for an engine, valid inside the `with` block and wiped when it ends.

        `memfd`: a sealed memory file; `path` is /proc/self/fd/N, also valid in a child given `fds`.
        `tmpfs`: a 0700 folder on tmpfs holding `model` (for engines that need a directory)."""
        if into == "memfd":
            with self._into_memfd(sha256) as weights:
                yield weights
        else:
            with self._into_tmpfs(sha256) as weights:
                yield weights

    def _decrypt_to(self, sha256: str, fd: int) -> None:
        try:
            for plain in self._plaintext(sha256):
                view = memoryview(plain)
                while view:
                    view = view[os.write(fd, view):]
        except IntegrityError as exc:
            raise ModelDamaged(
                f"model blob {sha256[:16]}... failed its integrity check: {exc}; it is damaged or was tampered "
                "with and was not loaded. Run `appliance models verify` and pull the model again"
            ) from None

    @contextlib.contextmanager
    def _into_memfd(self, sha256: str) -> Iterator[LoadableWeights]:
        fd = os.memfd_create(f"appliance-model-{sha256[:12]}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            self._decrypt_to(sha256, fd)
            # nobody, the worker included, may change the weights from here on
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW)
            yield LoadableWeights(Path(f"/proc/self/fd/{fd}"), (fd,))
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # frees the pages now, even if a stray mapping survives
            os.close(fd)

    @contextlib.contextmanager
    def _into_tmpfs(self, sha256: str) -> Iterator[LoadableWeights]:
        if not is_tmpfs(self.tmpfs):
            raise ModelUnavailable(f"{self.tmpfs} is not a tmpfs (memory) filesystem; decrypted weights may not go "
                                   "to disk: mount a tmpfs there or set crypto.tmpfs_dir to one")
        folder = Path(tempfile.mkdtemp(prefix="appliance-model-", dir=self.tmpfs))  # mode 0700
        try:
            fd = os.open(folder / "model", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                self._decrypt_to(sha256, fd)
            finally:
                os.close(fd)
            yield LoadableWeights(folder)
        finally:
            for file in folder.iterdir():
                with contextlib.suppress(OSError):
                    os.truncate(file, 0)
            shutil.rmtree(folder, ignore_errors=True)

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)
        self._envelope_path(sha256).unlink(missing_ok=True)

    def problem(self, sha256: str) -> str | None:
        """Why the stored model cannot be used (missing, damaged, tampered, not encrypted), or None if it is whole."""
        if not self._path(sha256).is_file():
            return "the stored file is missing"
        digest = hashlib.sha256()
        try:
            for plain in self._plaintext(sha256):
                digest.update(plain)
        except IntegrityError as exc:
            return str(exc)
        except KeyRingError as exc:
            return exc.message
        if digest.hexdigest() != sha256:
            return "the decrypted weights do not match their digest"
        return None

    def verify(self, sha256: str) -> bool:
        return self.problem(sha256) is None

    def stored_digests(self) -> list[str]:
        return sorted(p.name.removeprefix("sha256-") for p in self.root.glob("sha256-*") if p.is_file())

    def migrate_plaintext(self) -> list[str]:
        """Encrypt blobs an earlier version stored in plaintext; a blob whose content does not match its name is
        left for `models verify` to report. Returns the digests encrypted."""
        migrated = []
        for sha256 in self.stored_digests():
            path = self._path(sha256)
            with path.open("rb") as fh:
                if fh.read(len(MAGIC)) == MAGIC:
                    continue
                fh.seek(0)
                digest = hashlib.sha256()
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != sha256:
                continue
            with path.open("rb") as fh:
                self._encrypt_in_place(sha256, fh)
            migrated.append(sha256)
            log.info("model.encrypted_at_rest", sha256=sha256)
        return migrated

    def _encrypt_in_place(self, sha256: str, plain: BinaryIO) -> None:
        self.put(iter(lambda: plain.read(CHUNK), b""), expected_sha256=sha256)
        # The plaintext inode is now unlinked but still open here: overwrite it unless another link shares it.
        # Best effort: SSDs and copy-on-write filesystems may keep old blocks.
        stat = os.fstat(plain.fileno())
        if stat.st_nlink == 0:
            with Path(f"/proc/self/fd/{plain.fileno()}").open("r+b") as wipe:
                zeros = bytes(CHUNK)
                for _ in range(0, stat.st_size, CHUNK):
                    wipe.write(zeros)
                wipe.flush()
                os.fsync(wipe.fileno())

    def key_versions_in_use(self) -> dict[str, int]:
        """Which key version wraps each stored blob's data key."""
        used = {}
        for env_path in sorted(self.wrapped.glob("sha256-*.key")) if self.wrapped.is_dir() else []:
            with contextlib.suppress(IntegrityError, OSError):
                used[env_path.name.removeprefix("sha256-").removesuffix(".key")] = Envelope.decode(
                    env_path.read_bytes()).key_version
        return used

    def rewrap_all(self) -> RotationReport:
        """Wrap every data key under the active key version, one crash-safe file replacement each; the weights
        are not touched. Safe to run again after a crash: finished ones are skipped."""
        report = RotationReport()
        active = self.ring.active_version()
        if self.wrapped.is_dir():
            remove_stale_temps(self.wrapped)
        for sha256 in self.stored_digests():
            env_path = self._envelope_path(sha256)
            try:
                envelope = Envelope.decode(env_path.read_bytes())
                if envelope.key_version == active:
                    report.current.append(sha256)
                    continue
                with self._path(sha256).open("rb") as fh:
                    header = fh.read(HEADER_LEN)
                fresh = rewrap(self.ring, envelope, header, sha256)
                atomic_write(env_path, fresh.encode(), crash_label="rewrap")
                report.rewrapped.append(sha256)
            except (IntegrityError, KeyRingError, OSError) as exc:
                report.failed[sha256] = str(exc)
        crash_point("rewrap-all")
        return report


def open_model_store(data: DataDir, crypto: CryptoSettings) -> ModelStore:
    """The store of a data dir, with its key ring as the settings say; what killed imports left in staging goes."""
    if removed := remove_abandoned_imports(data.tmp):
        log.warning("model.import_abandoned", removed=removed)
    return ModelStore(data.models, data.tmp, KeyRing(data.keys, crypto.key_source), data.wrapped_keys,
                      segment_size=crypto.segment_mib * MIB, tmpfs=Path(crypto.tmpfs_dir))


def is_tmpfs(path: Path) -> bool:
    """Whether `path` lies on a memory filesystem (tmpfs/ramfs), by the longest matching mount point."""
    target, best, fstype = str(path.resolve()), "", ""
    with contextlib.suppress(OSError), Path("/proc/self/mounts").open() as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) >= len(best):
                best, fstype = parts[1], parts[2]
    return fstype in ("tmpfs", "ramfs")


def _mkstemp(directory: Path) -> tuple[int, str]:
    """A staging file, locked (flock) for as long as this process is importing into it: a lock nobody holds marks a
    file that a killed import left behind (`remove_abandoned_imports`)."""
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        fd, name = tempfile.mkstemp(dir=directory, prefix=STAGING_PREFIX)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:  # not taken for abandoned between its creation and the lock
            return fd, name
        os.close(fd)


def remove_abandoned_imports(staging: Path) -> list[str]:
    """Remove the staging files of imports that died (SIGKILL, power cut): those whose lock no live process holds.
    An import running in another process (`appliance models pull` beside the server) keeps its file. Returns the
    names removed."""
    removed = []
    for path in staging.glob(STAGING_PREFIX + "*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # in use
            continue
        try:
            path.unlink(missing_ok=True)
            removed.append(path.name)
        finally:
            os.close(fd)
    return removed
