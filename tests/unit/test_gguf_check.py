"""GGUF validation before any engine sees a file: real files written by the `gguf` package, then crafted damage.
Every refusal is an InvalidGguf (a RegistryError with a message), never an IndexError or a read past the end."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from appliance.config import CryptoSettings
from appliance.datadir import DataDir
from appliance.registry.catalog import load_catalog
from appliance.registry.gguf_check import InvalidGguf, read_gguf, validated
from appliance.registry.store import open_model_store
from tests.server import DEFAULT_MODEL
from tests.unit.ggufs import kv_field_position, make_gguf, patch, tensor_field_position

OFFSET, TYPE, N_DIMS, NAME_LEN = -1, -2, 2, 0  # parts of a tensor's info


def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_a_real_file_passes_and_its_metadata_is_read(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m.gguf", layers=3, embd=96, heads=6, heads_kv=2, context=256)
    info = read_gguf(path)
    assert (info.version, info.alignment, info.architecture) == (3, 32, "llama")
    assert [t.name for t in info.tensors] == ["random", "token_embd.weight"]
    assert info.tensors[1].shape == (32, 4) and info.tensors[1].nbytes == 4 * 32 * 4
    assert info.data_end == path.stat().st_size
    assert (info.arch_int("block_count"), info.arch_int("embedding_length"), info.arch_int("attention.head_count"),
            info.arch_int("attention.head_count_kv"), info.arch_int("context_length")) == (3, 96, 6, 2, 256)


def test_the_real_default_model_passes(template_dir: Path) -> None:
    """The default model as the suite pulls it (the session's template data dir), read through the store's public
    header read: only the header's segments are decrypted, and the whole file is checked against the catalog."""
    entry = load_catalog().models[DEFAULT_MODEL]
    store = open_model_store(DataDir(template_dir), CryptoSettings())
    assert store.stored_digests() == [entry.sha256]
    info = store.gguf_header(entry.sha256, entry.size_bytes)
    assert info.architecture == "llama" and len(info.tensors) == 272
    assert info.data_end == entry.size_bytes
    assert info.arch_int("block_count") == 30
    with pytest.raises(InvalidGguf, match="lies outside the file"):  # a size shorter than the tensors need
        store.gguf_header(entry.sha256, entry.size_bytes - 1)


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_validated_stream_passes_every_byte_through(tmp_path: Path, chunk: int) -> None:
    data = make_gguf(tmp_path / "m.gguf").read_bytes()
    assert b"".join(validated(chunks_of(data, chunk), len(data))) == data
    assert b"".join(validated(chunks_of(data, chunk))) == data  # size not announced: checked at the end


def test_out_of_file_tensor_offset_is_refused(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m.gguf")
    patch(path, tensor_field_position(path, 1, OFFSET), "<Q", 1 << 40)
    with pytest.raises(InvalidGguf, match=r"'token_embd\.weight' lies outside the file"):
        read_gguf(path)
    data = path.read_bytes()
    stream = validated(chunks_of(data, 1000))  # no size announced: refused when the stream ends short
    with pytest.raises(InvalidGguf, match="tensors need"):
        b"".join(stream)


def test_tensor_data_cut_short_is_refused(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(InvalidGguf, match="lies outside the file"):
        read_gguf(path)


def test_misaligned_and_overlapping_tensors_are_refused(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m.gguf")
    patch(path, tensor_field_position(path, 1, OFFSET), "<Q", 4)
    with pytest.raises(InvalidGguf, match="not aligned"):
        read_gguf(path)
    patch(path, tensor_field_position(path, 1, OFFSET), "<Q", 0)
    with pytest.raises(InvalidGguf, match="overlap"):
        read_gguf(path)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("GGUF.tensor_count", 1 << 40, "claims 1099511627776 tensors"),
    ("GGUF.tensor_count", 1000, "claims 1000 tensors"),
    ("GGUF.kv_count", 1 << 62, "metadata entries"),
])
def test_absurd_counts_are_refused(tmp_path: Path, field: str, value: int, says: str) -> None:
    path = make_gguf(tmp_path / "m.gguf")
    patch(path, kv_field_position(path, field, 0), "<Q", value)
    with pytest.raises(InvalidGguf, match=says):
        read_gguf(path)


def test_huge_string_lengths_are_refused(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m.gguf", extra={"general.name": "tiny"})
    patch(path, kv_field_position(path, "general.name", 0), "<Q", 1 << 60)  # the key's length
    with pytest.raises(InvalidGguf, match="string of 1152921504606846976 bytes"):
        read_gguf(path)
    path = make_gguf(tmp_path / "v.gguf", extra={"general.name": "tiny"})
    patch(path, kv_field_position(path, "general.name", 3), "<Q", 1 << 30)  # the value's length
    with pytest.raises(InvalidGguf, match=r"metadata 'general\.name' claims a string"):
        read_gguf(path)
    path = make_gguf(tmp_path / "t.gguf")
    patch(path, tensor_field_position(path, 0, NAME_LEN), "<Q", 1 << 20)
    with pytest.raises(InvalidGguf, match="tensor 0's name"):
        read_gguf(path)


def test_a_string_running_past_the_end_is_a_truncated_header(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m.gguf", extra={"general.name": "tiny"})
    patch(path, kv_field_position(path, "general.name", 3), "<Q", 1 << 23)  # allowed size, beyond the file
    with pytest.raises(InvalidGguf, match="ends inside its header"):
        read_gguf(path)


def test_bad_dimensions_and_types_are_refused(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m.gguf")
    patch(path, tensor_field_position(path, 0, N_DIMS), "<I", 5)
    with pytest.raises(InvalidGguf, match="5 dimensions"):
        read_gguf(path)
    path = make_gguf(tmp_path / "t.gguf")
    patch(path, tensor_field_position(path, 0, TYPE), "<I", 1234)
    with pytest.raises(InvalidGguf, match="unknown ggml type 1234"):
        read_gguf(path)


@pytest.mark.parametrize(("head", "says"), [
    (b"GGML" + bytes(20), "bad magic"),
    (b"GGUF" + (1).to_bytes(4, "little") + bytes(16), "version 1 is not supported"),
    (b"GGUF" + (99).to_bytes(4, "little") + bytes(16), "version 99 is not supported"),
    (b"GG", "bad magic"),
    (b"", "bad magic"),
    (b"GGUF\x03\x00", "ends inside its header"),
])
def test_bad_magic_version_and_truncated_starts(tmp_path: Path, head: bytes, says: str) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(head)
    with pytest.raises(InvalidGguf, match=says):
        read_gguf(path)


def test_every_truncation_of_the_header_is_refused_cleanly(tmp_path: Path) -> None:
    data = make_gguf(tmp_path / "m.gguf", extra={"general.name": "tiny"}).read_bytes()
    header_end = read_gguf(tmp_path / "m.gguf").data_offset
    cut = tmp_path / "cut.gguf"
    for length in range(header_end):
        cut.write_bytes(data[:length])
        with pytest.raises(InvalidGguf):
            read_gguf(cut)


def test_random_header_mutations_pass_or_are_refused_never_crash(tmp_path: Path) -> None:
    original = make_gguf(tmp_path / "m.gguf", extra={"general.name": "tiny"}).read_bytes()
    header_end = read_gguf(tmp_path / "m.gguf").data_offset
    rng = random.Random(7)
    mutated = tmp_path / "x.gguf"
    refused = 0
    for _ in range(600):
        data = bytearray(original)
        data[rng.randrange(header_end)] = rng.randrange(256)
        mutated.write_bytes(bytes(data))
        try:
            info = read_gguf(mutated)
        except InvalidGguf:
            refused += 1
        else:
            assert info.data_end <= len(data)  # whatever passes stays inside the file
    assert refused > 100


def test_bad_alignment_is_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.alignment", 48)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InvalidGguf, match="not a power of two"):
        read_gguf(path)



def test_huge_string_inside_an_array_is_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "hello", "world"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_gguf(path).metadata["tokenizer.ggml.tokens"] == 3  # arrays are kept as their length
    second_length = kv_field_position(path, "tokenizer.ggml.tokens", 7)  # before the damage: gguf's reader trips on it
    patch(path, second_length, "<Q", 1 << 40)
    with pytest.raises(InvalidGguf, match=r"metadata 'tokenizer\.ggml\.tokens' claims a string of 1099511627776"):
        read_gguf(path)
    patch(path, second_length, "<Q", 1 << 20)  # allowed, but beyond the end of the file
    with pytest.raises(InvalidGguf, match="ends inside its header"):
        read_gguf(path)
