"""Model versions, stages and aliases on a real SQLite database and real (small) GGUF files: what a pull adds,
what a request's `model` field resolves to, canary splits (sticky, proportional), and the in-place upgrade of an
existing install (every model becomes version 1 in production)."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from appliance.crypto.keyring import KeyRing
from appliance.datadir import DataDir
from appliance.db import MIGRATIONS, _statements, migrate
from appliance.errors import InvalidRequest, ModelNotFound, RegistryError
from appliance.registry.catalog import Catalog
from appliance.registry.service import ModelRegistry
from appliance.registry.store import ModelStore
from appliance.registry.versions import ModelVersions, pick_weighted, quantisation_of, split_ref, sticky_bucket
from tests.unit.ggufs import make_gguf

NOW = "2026-01-01T00:00:00+00:00"


@pytest.fixture
def registry(data: DataDir, conn: sqlite3.Connection) -> ModelRegistry:
    store = ModelStore(data.models, data.tmp, KeyRing(data.keys), data.wrapped_keys)
    return ModelRegistry(conn, store, Catalog(models={}))


def pull(registry: ModelRegistry, tmp_path: Path, name: str, file: str) -> int:
    """Pull a fresh GGUF under `name`; the version it became."""
    record = registry.pull(f"file:{make_gguf(tmp_path / file, context=256)}", name=name)
    found = registry.versions.with_digest(name, record.sha256)
    assert found is not None
    return found.version


def test_first_pull_is_production_later_content_is_staging_same_content_is_no_new_version(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    assert pull(registry, tmp_path, "m", "a.gguf") == 1
    assert pull(registry, tmp_path, "m", "b.gguf") == 2
    again = registry.pull(f"file:{tmp_path / 'b.gguf'}", name="m")
    assert [(v.version, v.stage) for v in registry.versions.list("m")] == [(1, "production"), (2, "staging")]
    assert registry.versions.with_digest("m", again.sha256).version == 2  # type: ignore[union-attr]
    first = registry.versions.get("m", 1)
    assert (first.format, first.context_length, first.quantisation) == ("gguf", 256, "")
    assert first.size_bytes == (tmp_path / "a.gguf").stat().st_size and first.source == f"file:{tmp_path / 'a.gguf'}"
    assert registry.get("m").sha256 == first.sha256  # the bare name serves production


def test_resolution_of_names_versions_and_aliases(registry: ModelRegistry, tmp_path: Path) -> None:
    pull(registry, tmp_path, "m", "a.gguf")
    pull(registry, tmp_path, "m", "b.gguf")
    versions = registry.versions
    assert versions.resolve("m").ref == "m@1"
    assert versions.resolve("m@2").ref == "m@2"
    for unknown in ("nope", "m@3", "m@0", "m@x", "@1", "nope@1"):
        with pytest.raises(ModelNotFound):
            versions.resolve(unknown)
    versions.set_alias("chat", "m", None, None, NOW)
    assert (versions.resolve("chat").ref, versions.resolve("chat").alias) == ("m@1", "chat")
    versions.set_alias("pinned", "m", 2, None, NOW)
    assert versions.resolve("pinned").ref == "m@2"
    versions.set_production("m", 2, NOW)
    assert versions.resolve("chat").ref == "m@2"  # follows production
    assert versions.get("m", 1).stage == "archived"
    with pytest.raises(ModelNotFound):
        versions.resolve("m@1")  # archived versions serve no more
    assert versions.worker_key("chat") == "m@2" and versions.worker_key("nope") == "nope"


def test_canary_split_is_sticky_per_subject_and_close_to_its_weight(registry: ModelRegistry, tmp_path: Path) -> None:
    pull(registry, tmp_path, "m", "a.gguf")
    pull(registry, tmp_path, "m", "b.gguf")
    registry.versions.set_alias("m", "m", None, {1: 90, 2: 10}, NOW)  # a canary on the bare name
    picks = {f"key:{i}": registry.versions.resolve("m", f"key:{i}") for i in range(2000)}
    share = Counter(route.version for route in picks.values())
    assert 150 <= share[2] <= 250, share  # 10% of 2000, give or take
    assert all(route.canary == (route.version == 2) for route in picks.values())
    for subject, route in list(picks.items())[:50]:
        assert registry.versions.resolve("m", subject).ref == route.ref  # sticky
    assert registry.versions.worker_key("m") == "m@1"  # outside the split: the stable version


def test_weights_pick_by_cumulative_share() -> None:
    weights = {1: 90, 2: 10}
    assert [pick_weighted(weights, b) for b in (0, 89, 90, 99)] == [1, 1, 2, 2]
    assert sticky_bucket("a", "key:1", 100) == sticky_bucket("a", "key:1", 100)
    assert split_ref("name@12") == ("name", 12) and split_ref("name") == ("name", None)


def test_alias_validation(registry: ModelRegistry, tmp_path: Path) -> None:
    pull(registry, tmp_path, "m", "a.gguf")
    pull(registry, tmp_path, "m", "b.gguf")
    pull(registry, tmp_path, "other", "c.gguf")
    versions = registry.versions
    with pytest.raises(InvalidRequest, match="sum"):
        versions.set_alias("chat", "m", None, {1: 50, 2: 40}, NOW)
    with pytest.raises(InvalidRequest, match="a model's name"):
        versions.set_alias("other", "m", None, None, NOW)
    with pytest.raises(ModelNotFound):
        versions.set_alias("chat", "m", 7, None, NOW)
    with pytest.raises(ModelNotFound):
        versions.set_alias("chat", "absent", None, None, NOW)
    versions.set_production("m", 2, NOW)
    with pytest.raises(InvalidRequest, match="archived"):
        versions.set_alias("chat", "m", 1, None, NOW)
    assert versions.aliases() == []


def test_promote_mirrors_the_models_row_and_completes_canaries_of_the_promoted_version(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    pull(registry, tmp_path, "m", "a.gguf")
    pull(registry, tmp_path, "m", "b.gguf")
    pull(registry, tmp_path, "m", "c.gguf")
    versions = registry.versions
    versions.set_alias("m", "m", None, {1: 90, 2: 10}, NOW)
    versions.set_alias("three", "m", None, {1: 50, 3: 50}, NOW)
    previous = versions.set_production("m", 2, "2026-01-02T00:00:00+00:00")
    assert previous is not None and previous.version == 1
    assert registry.get("m").sha256 == versions.get("m", 2).sha256
    assert versions.alias("m").weights is None  # type: ignore[union-attr]
    assert versions.alias("three").weights == {1: 50, 3: 50}  # type: ignore[union-attr]
    assert versions.previous_production("m").version == 1  # type: ignore[union-attr]


def test_one_version_can_be_removed_unless_it_serves(registry: ModelRegistry, data: DataDir, tmp_path: Path) -> None:
    pull(registry, tmp_path, "m", "a.gguf")
    pull(registry, tmp_path, "m", "b.gguf")
    pull(registry, tmp_path, "m", "c.gguf")
    registry.versions.set_alias("chat", "m", 2, None, NOW)
    for ref, code in (("m@1", "version_in_production"), ("m@2", "version_in_use")):
        with pytest.raises(RegistryError) as refused:
            registry.remove(ref)
        assert refused.value.code == code
    gone = registry.remove("m@3")
    assert [v.version for v in registry.versions.list("m")] == [1, 2]
    assert f"sha256-{gone.sha256}" not in {p.name for p in data.models.iterdir()}
    with pytest.raises(ModelNotFound):
        registry.remove("m@3")


def test_quantisation_names_llama_file_types() -> None:
    assert quantisation_of({"general.file_type": 3}) == "Q4_1"
    assert quantisation_of({"general.file_type": 15}) == "Q4_K_M"
    assert quantisation_of({}) == ""


def test_an_existing_install_upgrades_in_place_every_model_becoming_version_one_in_production(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    conn.row_factory = sqlite3.Row
    for version, script in enumerate(MIGRATIONS[:8], start=1):  # the database as the previous release left it
        for statement in _statements(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={version}")
    conn.execute("INSERT INTO models VALUES ('old', 'pypi:x', 'gguf', ?, 42, 'MIT', ?)", ("ab" * 32, NOW))
    assert migrate(conn) == len(MIGRATIONS)
    versions = ModelVersions(conn)
    (only,) = versions.list("old")
    assert (only.version, only.stage, only.sha256, only.size_bytes, only.licence) == (1, "production", "ab" * 32, 42,
                                                                                       "MIT")
    assert versions.resolve("old").ref == "old@1"
    conn.close()
