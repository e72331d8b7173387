"""Real GGUF files for tests, written with the `gguf` package (llama.cpp's own writer), and surgery on them."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np


def make_gguf(path: Path, *, payload_bytes: int = 4096, layers: int = 2, embd: int = 64, heads: int = 4,
              heads_kv: int = 2, context: int = 128, extra: dict[str, str] | None = None) -> Path:
    """A small valid llama-architecture GGUF; its random tensor makes every file's digest different."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(embd)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads_kv)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    writer.add_tensor("random", np.frombuffer(os.urandom(payload_bytes), dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensor_field_position(path: Path, tensor: int, part: int) -> int:
    """Byte position in the file of one part of a tensor's info (parts: name len, name, n_dims, dims, type, offset)."""
    field = gguf.GGUFReader(str(path)).tensors[tensor].field
    index = part % len(field.parts)
    return int(field.offset) + sum(int(p.nbytes) for p in field.parts[:index])


def kv_field_position(path: Path, key: str, part: int) -> int:
    field = gguf.GGUFReader(str(path)).fields[key]
    index = part % len(field.parts)
    return int(field.offset) + sum(int(p.nbytes) for p in field.parts[:index])


def patch(path: Path, position: int, fmt: str, value: int) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, position, value)
    path.write_bytes(bytes(data))
    return path
