"""Validate a GGUF file's header before any engine sees it: the parser of the engine is native code, so a crafted
header (an out-of-file tensor offset, an absurd count, a huge string length) must be refused here, in Python,
without reading out of bounds. Also gives the metadata that memory placement needs (layers, widths, heads).

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3, little-endian)."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import RegistryError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 24  # a chat template or a vocabulary entry; 16 MiB is far beyond any real one
MAX_ARRAY_ITEMS = 1 << 24  # vocabularies have ~10^5 entries
MAX_ARRAY_DEPTH = 2
MAX_HEADER_BYTES = 256 << 20
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 64  # GGML_MAX_NAME, including the terminating NUL
KEPT_STRING_BYTES = 256  # metadata strings longer than this are validated but not kept

# ggml type -> (elements per block, bytes per block), as in ggml's type traits
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292), 16: (256, 66),
    17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136),
    24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54),
    35: (256, 66), 39: (32, 17),
}
# GGUF metadata value types: fixed-size scalars by struct format; 8 = string, 9 = array
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class InvalidGguf(RegistryError):
    """The file is not a GGUF that the engines may be given."""

    def __init__(self, message: str, code: str = "invalid_gguf") -> None:
        super().__init__(message, code=code)


def _not_gguf() -> InvalidGguf:
    return InvalidGguf("the file is not a GGUF model (bad magic bytes); only .gguf files can be imported",
                       code="unsupported_format")


class _NeedMore(Exception):
    """The buffer ends before the header does (the caller may read more and retry)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GgufInfo:
    version: int
    alignment: int
    data_offset: int
    """Where the tensor data starts in the file."""
    data_end: int
    """The smallest file size that holds every tensor."""
    metadata: dict[str, object] = field(repr=False)
    """Scalars and short strings; arrays appear as their length."""
    tensors: list[TensorInfo] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_int(self, key: str, default: int = 0) -> int:
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class _Cursor:
    def __init__(self, buf: bytes | bytearray | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise _NeedMore
        view, self.pos = self.buf[self.pos : end], end
        return view

    def unpack(self, fmt: str) -> object:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))[0]

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack("<Q", self.take(8))[0]
        return value

    def string(self, limit: int, what: str) -> bytes:
        n = self.u64()
        if n > limit:
            raise InvalidGguf(f"{what} claims a string of {n} bytes (limit {limit}); the file is damaged or crafted")
        return bytes(self.take(n))


_U64 = struct.Struct("<Q")


def _skip_strings(cur: _Cursor, count: int, key: str) -> None:
    """Step over an array of strings (a vocabulary: ~10^5 of them) in one tight loop, each length checked."""
    buf, pos, end, unpack = cur.buf, cur.pos, len(cur.buf), _U64.unpack_from
    for _ in range(count):
        if pos + 8 > end:
            raise _NeedMore
        (n,) = unpack(buf, pos)
        if n > MAX_STRING_BYTES:
            raise InvalidGguf(f"metadata '{key}' claims a string of {n} bytes (limit {MAX_STRING_BYTES}); the file "
                              "is damaged or crafted")
        pos += 8 + n
    if pos > end:
        raise _NeedMore
    cur.pos = pos


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> object:
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype])
    if vtype == _STRING:
        raw = cur.string(MAX_STRING_BYTES, f"metadata '{key}'")
        return raw.decode("utf-8", "replace") if len(raw) <= KEPT_STRING_BYTES else f"<{len(raw)} bytes>"
    if vtype == _ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise InvalidGguf(f"metadata '{key}' nests arrays deeper than {MAX_ARRAY_DEPTH}")
        etype, count = cur.u32(), cur.u64()
        if count > MAX_ARRAY_ITEMS:
            raise InvalidGguf(f"metadata '{key}' claims an array of {count} items (limit {MAX_ARRAY_ITEMS})")
        if etype in _SCALARS:
            cur.take(count * struct.calcsize(_SCALARS[etype]))  # fixed-size items: skip without a loop
        elif etype == _STRING:
            _skip_strings(cur, count, key)
        elif etype == _ARRAY:
            for _ in range(count):
                _value(cur, etype, key, depth + 1)
        else:
            raise InvalidGguf(f"metadata '{key}' is an array of unknown type {etype}")
        return count
    raise InvalidGguf(f"metadata '{key}' has unknown type {vtype}")


def _tensor(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
    raw = cur.string(MAX_TENSOR_NAME - 1, f"tensor {index}'s name")
    name = raw.decode("utf-8", "replace")
    n_dims = cur.u32()
    if not 1 <= n_dims <= MAX_DIMS:
        raise InvalidGguf(f"tensor '{name}' has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
    shape = tuple(cur.u64() for _ in range(n_dims))
    ggml_type, offset = cur.u32(), cur.u64()
    return name, shape, ggml_type, offset


def _nbytes(name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    if ggml_type not in GGML_TYPES:
        raise InvalidGguf(f"tensor '{name}' has unknown ggml type {ggml_type}")
    block, size = GGML_TYPES[ggml_type]
    elements = 1
    for dim in shape:
        if dim == 0 or dim >= 1 << 62:
            raise InvalidGguf(f"tensor '{name}' has an impossible dimension {dim}")
        elements *= dim
        if elements >= 1 << 62:
            raise InvalidGguf(f"tensor '{name}' claims {elements}+ elements; the file is damaged or crafted")
    if shape[0] % block:
        raise InvalidGguf(f"tensor '{name}': first dimension {shape[0]} is not a multiple of the block size {block}")
    return elements // block * size


def _parse_header(buf: bytes | bytearray | memoryview, file_size: int) -> GgufInfo:
    """Parse the header in `buf` (the file's first bytes); `_NeedMore` when it ends before the header does."""
    cur = _Cursor(buf)
    if bytes(cur.buf[:4]) != MAGIC[: len(cur.buf[:4])]:
        raise _not_gguf()
    cur.take(4)
    version = cur.u32()
    if version not in VERSIONS:
        raise InvalidGguf(f"GGUF version {version} is not supported (only {' and '.join(map(str, VERSIONS))}); "
                          "convert the model with a current llama.cpp")
    n_tensors, n_kv = cur.u64(), cur.u64()
    # every tensor info takes at least 8+1+4+8+4+8 bytes and every entry 8+1+4+1: counts must fit in the file
    if n_tensors > MAX_TENSORS or n_tensors * 33 > file_size:
        raise InvalidGguf(f"the header claims {n_tensors} tensors, impossible in a {file_size}-byte file")
    if n_kv > MAX_KV or n_kv * 14 > file_size:
        raise InvalidGguf(f"the header claims {n_kv} metadata entries, impossible in a {file_size}-byte file")
    metadata: dict[str, object] = {}
    for i in range(n_kv):
        key = cur.string(MAX_KEY_BYTES, f"metadata key {i}").decode("utf-8", "replace")
        if key in metadata:
            raise InvalidGguf(f"metadata key '{key}' appears twice")
        metadata[key] = _value(cur, cur.u32(), key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise InvalidGguf(f"general.alignment {alignment!r} is not a power of two")
    raw_tensors = [_tensor(cur, i) for i in range(n_tensors)]
    data_offset = -(-cur.pos // alignment) * alignment
    return _check_tensors(version, alignment, data_offset, metadata, raw_tensors, file_size)


def _check_tensors(version: int, alignment: int, data_offset: int, metadata: dict[str, object],
                   raw: list[tuple[str, tuple[int, ...], int, int]], file_size: int) -> GgufInfo:
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for name, shape, ggml_type, offset in raw:
        if name in names:
            raise InvalidGguf(f"tensor '{name}' appears twice")
        names.add(name)
        nbytes = _nbytes(name, shape, ggml_type)
        if offset % alignment:
            raise InvalidGguf(f"tensor '{name}' offset {offset} is not aligned to {alignment} bytes")
        if data_offset + offset + nbytes > file_size:
            raise InvalidGguf(f"tensor '{name}' lies outside the file (bytes {data_offset + offset}.."
                              f"{data_offset + offset + nbytes} of {file_size}); the file is truncated or crafted")
        tensors.append(TensorInfo(name, shape, ggml_type, offset, nbytes))
    ordered = sorted(tensors, key=lambda t: t.offset)
    for before, after in itertools.pairwise(ordered):
        if before.offset + before.nbytes > after.offset:
            raise InvalidGguf(f"tensors '{before.name}' and '{after.name}' overlap; the file is crafted")
    data_end = data_offset + max((t.offset + t.nbytes for t in tensors), default=0)
    return GgufInfo(version, alignment, data_offset, data_end, metadata, tensors)


def _parse_growing(read_more: Iterator[bytes], file_size: int, head: bytearray) -> GgufInfo:
    """Parse from `head`, pulling more bytes (doubling what is tried each time, so parsing stays linear)."""
    want, exhausted = 1 << 20, False
    while True:
        while not exhausted and len(head) < min(want, file_size):
            chunk = next(read_more, b"")
            exhausted = not chunk
            head += chunk
        try:
            return _parse_header(head, file_size)
        except _NeedMore:
            if (exhausted or len(head) >= file_size) and len(head) < len(MAGIC):
                raise _not_gguf() from None
            if exhausted or len(head) >= file_size:
                raise InvalidGguf("the GGUF file ends inside its header; it is truncated or crafted") from None
            if want >= MAX_HEADER_BYTES:
                raise InvalidGguf(f"the GGUF header is larger than {MAX_HEADER_BYTES >> 20} MiB; "
                                  "the file is damaged or crafted") from None
            want *= 2
        except struct.error as exc:  # take() bounds every read; this only guards against a parse slip
            raise InvalidGguf(f"the GGUF header cannot be parsed: {exc}") from None


def read_gguf(path: Path) -> GgufInfo:
    """Validate a GGUF file on disk and return its header."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        return _parse_growing(iter(lambda: fh.read(1 << 20), b""), size, bytearray())


def read_gguf_stream(chunks: Iterable[bytes], size: int) -> GgufInfo:
    """Validate and return the header of a GGUF given as a byte stream of `size` bytes; reads only the header."""
    source = iter(chunks)
    try:
        return _parse_growing(source, size, bytearray())
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()  # e.g. stop decrypting the rest of the file


def validated(chunks: Iterable[bytes], expected_size: int | None = None) -> Iterator[bytes]:
    """Pass a GGUF byte stream through, validating it on the way; raises (before the last chunk is handed on)
    when the header is bad or the tensors lie beyond the end of the stream, so a store refuses the file."""
    source = iter(chunks)
    head = bytearray()
    # offsets are checked against the announced size, or else against the real size once the stream ends
    claimed = expected_size if expected_size is not None else 1 << 62
    info = _parse_growing(source, claimed, head)
    size = len(head)
    pending = bytes(head)
    for chunk in source:
        if pending:
            yield pending
        pending, size = chunk, size + len(chunk)
    if size < info.data_end:
        raise InvalidGguf(f"the GGUF file's tensors need {info.data_end} bytes but it has {size}; "
                          "it is truncated or crafted")
    if expected_size is not None and size != expected_size:
        raise InvalidGguf(f"the source announced {expected_size} bytes but sent {size}")
    if pending:
        yield pending
