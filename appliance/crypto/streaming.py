"""A segmented streaming AEAD file format in the style of Tink's AES-GCM-HKDF streaming.

File = header || segment_0 || ... || segment_n. The header (HEADER_LEN bytes) holds the magic, the format
version, the segment size S, a random salt and a random 7-byte nonce prefix. The per-file key is
HKDF-SHA256(data key, salt, info). Every segment holds S plaintext bytes (the last one 0..S) sealed with
AES-256-GCM under nonce = prefix || segment counter (4 bytes, big-endian) || last-segment flag (1 byte), and
with SHA-256(header) as associated data. The last segment is the only one sealed with the flag set, so
truncation, reordering, duplication, appended bytes and any flipped bit fail authentication.

Only `cryptography`'s AESGCM and HKDF are used; nothing here is a hand-made primitive."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"APLSTRM"
FORMAT_VERSION = 1
MIB = 1 << 20
MIN_SEGMENT = 1 * MIB
MAX_SEGMENT = 4 * MIB
DEFAULT_SEGMENT = 1 * MIB
SALT_LEN = 32
NONCE_PREFIX_LEN = 7
TAG_LEN = 16
DATA_KEY_LEN = 32
_HEADER = struct.Struct(f">{len(MAGIC)}sBI{SALT_LEN}s{NONCE_PREFIX_LEN}s")
HEADER_LEN = _HEADER.size
HKDF_INFO = b"appliance model stream v1"


class IntegrityError(Exception):
    """The file is not what was encrypted: damaged, truncated, extended, reordered, or under another key."""


@dataclass(frozen=True)
class StreamHeader:
    segment_size: int
    salt: bytes
    nonce_prefix: bytes
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        return _HEADER.pack(MAGIC, self.version, self.segment_size, self.salt, self.nonce_prefix)

    @classmethod
    def decode(cls, raw: bytes) -> StreamHeader:
        if len(raw) < HEADER_LEN:
            raise IntegrityError(f"header is {len(raw)} bytes, expected {HEADER_LEN}: the file is truncated")
        magic, version, segment_size, salt, prefix = _HEADER.unpack(raw[:HEADER_LEN])
        if magic != MAGIC:
            raise IntegrityError("not an encrypted model file (bad magic)")
        if version != FORMAT_VERSION:
            raise IntegrityError(f"unknown format version {version}; this appliance reads version {FORMAT_VERSION}")
        if not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
            raise IntegrityError(f"segment size {segment_size} is outside {MIN_SEGMENT}..{MAX_SEGMENT}")
        return cls(segment_size, salt, prefix, version)

    @classmethod
    def fresh(cls, segment_size: int = DEFAULT_SEGMENT) -> StreamHeader:
        if not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
            raise ValueError(f"segment size must be {MIN_SEGMENT}..{MAX_SEGMENT} bytes, not {segment_size}")
        return cls(segment_size, os.urandom(SALT_LEN), os.urandom(NONCE_PREFIX_LEN))


class _Segments:
    """The per-file key and the nonce/associated data of each segment."""

    def __init__(self, data_key: bytes, header: StreamHeader) -> None:
        if len(data_key) != DATA_KEY_LEN:
            raise ValueError(f"data key must be {DATA_KEY_LEN} bytes")
        file_key = HKDF(hashes.SHA256(), DATA_KEY_LEN, header.salt, HKDF_INFO).derive(data_key)
        self.aead = AESGCM(file_key)
        self.prefix = header.nonce_prefix
        self.aad = hashlib.sha256(header.encode()).digest()

    def nonce(self, counter: int, last: bool) -> bytes:
        if counter >= 1 << 32:
            raise ValueError("too many segments for one file")
        return self.prefix + struct.pack(">IB", counter, 1 if last else 0)


class StreamEncryptor:
    """Feed plaintext chunks of any size; get header and sealed segments back, in order."""

    def __init__(self, data_key: bytes, header: StreamHeader | None = None) -> None:
        self.header = header or StreamHeader.fresh()
        self._seg = _Segments(data_key, self.header)
        self._buffer = bytearray()
        self._counter = 0

    def start(self) -> bytes:
        return self.header.encode()

    def update(self, chunk: bytes) -> Iterator[bytes]:
        """Seal every full segment that is certainly not the last (one more byte must follow it)."""
        self._buffer += chunk
        size, start = self.header.segment_size, 0
        view = memoryview(self._buffer)
        try:
            while len(self._buffer) - start > size:
                yield self._seal(view[start : start + size], last=False)
                start += size
        finally:
            view.release()
        del self._buffer[:start]

    def finish(self) -> bytes:
        """The last segment (0..S plaintext bytes, flagged last)."""
        return self._seal(bytes(self._buffer), last=True)

    def _seal(self, plain: bytes | memoryview, *, last: bool) -> bytes:
        sealed = self._seg.aead.encrypt(self._seg.nonce(self._counter, last), plain, self._seg.aad)
        self._counter += 1
        return sealed


def encrypt_bytes(data_key: bytes, plaintext: bytes, header: StreamHeader | None = None) -> bytes:
    enc = StreamEncryptor(data_key, header)
    return enc.start() + b"".join(enc.update(plaintext)) + enc.finish()


def read_header(fh: BinaryIO) -> tuple[StreamHeader, bytes]:
    raw = fh.read(HEADER_LEN)
    return StreamHeader.decode(raw), raw


def decrypt_segments(data_key: bytes, header: StreamHeader, fh: BinaryIO, ciphertext_len: int) -> Iterator[bytes]:
    """Plaintext segments of a file whose header was already read from `fh`; `ciphertext_len` is the number of
    bytes after the header. Raises IntegrityError at the first segment that fails authentication."""
    seg = _Segments(data_key, header)
    full = header.segment_size + TAG_LEN
    if ciphertext_len < TAG_LEN:
        raise IntegrityError("the file ends before its first segment: it is truncated")
    count = max(1, -(-ciphertext_len // full))
    last_len = ciphertext_len - (count - 1) * full
    if last_len < TAG_LEN:
        raise IntegrityError("the last segment is shorter than a tag: the file is truncated or extended")
    for i in range(count):
        last = i == count - 1
        want = last_len if last else full
        sealed = fh.read(want)
        if len(sealed) != want:
            raise IntegrityError(f"segment {i} is cut short: the file changed while it was read")
        try:
            yield seg.aead.decrypt(seg.nonce(i, last), sealed, seg.aad)
        except InvalidTag:
            raise IntegrityError(f"segment {i} of {count} failed authentication") from None


def decrypt_bytes(data_key: bytes, blob: bytes) -> bytes:
    import io

    fh = io.BytesIO(blob)
    header, _ = read_header(fh)
    return b"".join(decrypt_segments(data_key, header, fh, len(blob) - HEADER_LEN))
