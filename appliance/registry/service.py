"""The model registry: pull from a catalog name or a source, list, remove, verify. Records live in SQLite."""

from __future__ import annotations

import builtins
import hashlib
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from appliance.audit import AuditEvent, AuditLog, audited
from appliance.errors import ModelNotFound, RegistryError
from appliance.registry import gguf_check
from appliance.registry.catalog import Catalog
from appliance.registry.folder import check_folder, pack_folder
from appliance.registry.remote import remote_source
from appliance.registry.sources import ImportPolicy, Progress, SourceSpec, open_source, parse_source
from appliance.registry.store import ModelStore
from appliance.registry.versions import ModelVersion, ModelVersions, quantisation_of, split_ref

_UPSERT = ("INSERT INTO models(name, source, format, sha256, size_bytes, licence, created_at) VALUES (?,?,?,?,?,?,?) "
           "ON CONFLICT(name) DO UPDATE SET source=excluded.source, format=excluded.format, sha256=excluded.sha256, "
           "size_bytes=excluded.size_bytes, licence=excluded.licence, created_at=excluded.created_at")


class ModelRecord(msgspec.Struct, frozen=True):
    name: str
    source: str
    format: str
    sha256: str
    size_bytes: int
    licence: str
    created_at: str


def valid_model_name(name: str) -> str:
    if not name or len(name) > 128 or not all(c.isalnum() or c in "-_.:" for c in name) or name[0] in ".-":
        raise RegistryError(f"{name!r} is not a valid model name: use letters, digits, '-', '_', '.', ':'",
                            param="name")
    return name


class _Wanted(msgspec.Struct, frozen=True):
    """What a pull resolved to before fetching anything."""

    name: str
    spec: SourceSpec
    source: str
    expected: str | None
    format: str
    licence: str


class ModelRegistry:
    def __init__(self, conn: sqlite3.Connection, store: ModelStore, catalog: Catalog,
                 audit: AuditLog | None = None, policy: ImportPolicy | None = None) -> None:
        self.policy = policy or ImportPolicy()
        self.conn = conn
        self.store = store
        self.catalog = catalog
        self.audit = audit
        self.versions = ModelVersions(conn)

    def _resolve(self, source_or_name: str, name: str | None) -> _Wanted:
        entry = self.catalog.models.get(source_or_name)
        if entry is not None:
            return _Wanted(valid_model_name(name or source_or_name), parse_source(entry.source), entry.source,
                           entry.sha256, entry.format, entry.licence)
        spec = parse_source(source_or_name, self.policy)
        return _Wanted(valid_model_name(name or spec.default_name), spec, source_or_name, None, "gguf", "")

    def pull(self, source_or_name: str, name: str | None = None, *, actor: str = "system",
             progress: Progress | None = None) -> ModelRecord:
        """Fetch a catalog entry or a source into the store and record it under `name`; the bytes' progress goes to
        `progress`, else to a progress bar on stderr."""
        if source_or_name.startswith("file:") and (folder := Path(source_or_name[5:]).expanduser()).is_dir():
            return self.add_folder(name or folder.name, folder, source=source_or_name, actor=actor)
        with audited(self.audit, actor, "model.pull", name or source_or_name, source=source_or_name) as event:
            want = self._resolve(source_or_name, name)
            event.target, event.details["source"] = want.name, want.source
            existing = self.find(want.name)
            if (existing is not None and want.expected and existing.sha256 == want.expected
                    and self.store.verify(want.expected)):
                event.details.update(sha256=existing.sha256, size_bytes=existing.size_bytes, unchanged=True)
                return existing
            blob = self._fetch(want.spec, want.expected, want.format, progress)
            event.details["format"] = want.format
            return self._record(want.name, want.source, want.format, blob.sha256, blob.size_bytes, want.licence,
                                event)

    def _fetch(self, spec: SourceSpec, expected: str | None, fmt: str,  # type: ignore[no-untyped-def]
               progress: Progress | None = None):
        if fmt != "gguf":
            raise RegistryError(f"the store holds GGUF files only, not {fmt!r}", code="unsupported_format")
        with open_source(spec, self.policy, progress) as download:
            # validated on the way in: a bad header or an out-of-file tensor fails the put, so nothing is stored
            chunks = gguf_check.validated(download, download.total)
            return self.store.put(chunks, expected_sha256=expected or download.sha256)

    def add_folder(self, name: str, folder: Path, *, source: str, licence: str = "",
                   actor: str = "system") -> ModelRecord:
        """Store a Hugging Face model folder (packed into one blob) under `name`, format "hf" (served by vLLM)."""
        with audited(self.audit, actor, "model.add", name, source=source, format="hf") as event:
            files = check_folder(folder, allow_remote_code=self.policy.allow_remote_code)
            blob = self.store.put(pack_folder(folder, files))
            record = self._record(valid_model_name(name), source, "hf", blob.sha256, blob.size_bytes, licence, event)
        return record

    def add_remote(self, name: str, urls: Sequence[str], upstream_model: str, *, weights: Sequence[int] = (),
                   concurrency: Sequence[int] = (), actor: str = "system") -> ModelRecord:
        """Record `name` as served by OpenAI-compatible upstreams at `urls`, routed by `weights` (their keys are kept
        by the remote engine, never here). Nothing is stored; the digest is that of the source, so the record stays
        unique, and a changed pool is a new version."""
        source = remote_source(urls, upstream_model, weights, concurrency)
        with audited(self.audit, actor, "model.add", name, source=source, format="remote") as event:
            digest = hashlib.sha256(source.encode()).hexdigest()
            record = self._record(valid_model_name(name), source, "remote", digest, 0, "", event)
        return record

    def _record(self, name: str, source: str, fmt: str, sha256: str, size: int, licence: str,
                event: AuditEvent) -> ModelRecord:
        """Record stored content under `name`: its first version (in production), or a new version in staging
        when the name exists with other content (`appliance models promote` serves it); the same content again
        is the version that has it."""
        record = ModelRecord(name, source, fmt, sha256, size, licence, datetime.now(UTC).isoformat(timespec="seconds"))
        event.details.update(sha256=sha256, size_bytes=size)
        if (same := self.versions.with_digest(name, sha256)) is not None:
            event.details.update(version=same.version, stage=same.stage, unchanged=True)
            return _as_record(same)
        quantisation, context = self._describe(fmt, sha256, size)
        with event.commit():
            if self.find(name) is None:
                self.conn.execute(_UPSERT, msgspec.structs.astuple(record))
            added = self.versions.add(name, source=source, format=fmt, sha256=sha256, size_bytes=size,
                                      licence=licence, created_at=record.created_at, quantisation=quantisation,
                                      context_length=context)
            event.details.update(version=added.version, stage=added.stage)
        return record

    def _describe(self, fmt: str, sha256: str, size: int) -> tuple[str, int]:
        """The quantisation and trained context length of a stored GGUF, from its header (decrypted in memory)."""
        if fmt != "gguf":
            return "", 0
        try:
            info = self.store.gguf_header(sha256, size)
        except RegistryError:
            return "", 0
        return quantisation_of(info.metadata), info.arch_int("context_length")

    def find(self, name: str) -> ModelRecord | None:
        """A model (its production version) by name, or one version by `name@N`."""
        if "@" in name:
            model, version = split_ref(name)
            found = self.versions.find(model, version) if version is not None else None
            return _as_record(found) if found is not None else None
        row = self.conn.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        return msgspec.convert(dict(row), ModelRecord) if row else None

    def get(self, name: str) -> ModelRecord:
        record = self.find(name)
        if record is None:
            raise model_not_found(name)
        return record

    def list(self) -> builtins.list[ModelRecord]:
        rows = self.conn.execute("SELECT * FROM models ORDER BY name").fetchall()
        return [msgspec.convert(dict(r), ModelRecord) for r in rows]

    def remove(self, name: str, *, actor: str = "system") -> ModelRecord:
        """Remove a model with all its versions, or one version (`name@N`) that is neither in production nor routed
        to by an alias."""
        if "@" in name:
            return self._remove_version(name, actor)
        with audited(self.audit, actor, "model.remove", name) as event:
            record = self.get(name)
            versions = self.versions.list(name)
            event.details.update(source=record.source, sha256=record.sha256, size_bytes=record.size_bytes,
                                 versions=len(versions))
            with event.commit():
                self.conn.execute("DELETE FROM models WHERE name = ?", (name,))
                self.versions.remove_model(name)
        for digest in {record.sha256, *(v.sha256 for v in versions)}:
            self._drop_blob_if_unused(digest)
        return record

    def _remove_version(self, ref: str, actor: str) -> ModelRecord:
        with audited(self.audit, actor, "model.remove", ref) as event:
            model, number = split_ref(ref)
            version = self.versions.get(model, number or 0)
            if version.stage == "production":
                raise RegistryError(f"{ref} is in production; promote another version first, or remove '{model}' "
                                    "with all its versions", code="version_in_production")
            if routed := self.versions.routes_to(model, version.version):
                raise RegistryError(f"{ref} is routed to by the alias {', '.join(routed)}; point it elsewhere first",
                                    code="version_in_use")
            event.details.update(source=version.source, sha256=version.sha256, size_bytes=version.size_bytes)
            with event.commit():
                self.conn.execute("DELETE FROM model_versions WHERE model = ? AND version = ?",
                                  (model, version.version))
        self._drop_blob_if_unused(version.sha256)
        return _as_record(version)

    def _drop_blob_if_unused(self, sha256: str) -> None:
        if (self.conn.execute("SELECT 1 FROM models WHERE sha256 = ?", (sha256,)).fetchone() is None
                and not self.versions.digest_in_use(sha256)):
            self.store.delete(sha256)

    def verify(self) -> builtins.list[ModelRecord]:
        """The models whose stored file is missing or does not match its digest."""
        return [r for r in self.list() if r.format != "remote" and not self.store.verify(r.sha256)]

    def check(self) -> builtins.list[tuple[ModelVersion, str | None]]:
        """Every stored version (a remote one stores nothing) with what is wrong with its file, None when it is
        intact: each is decrypted and checked segment by segment, as `appliance models verify` does."""
        return [(v, self.store.problem(v.sha256)) for v in self.versions.all() if v.format != "remote"]

    def digests(self) -> set[str]:
        """Every digest a model or one of its versions still refers to."""
        return {r.sha256 for r in self.list()} | {v.sha256 for v in self.versions.all()}


def _as_record(version: ModelVersion) -> ModelRecord:
    return ModelRecord(version.model, version.source, version.format, version.sha256, version.size_bytes,
                       version.licence, version.created_at)


def model_not_found(name: str) -> ModelNotFound:
    """The one answer for a model that is not there (or that the caller may not use: the same, so as not to tell)."""
    return ModelNotFound(f"The model '{name}' does not exist; `appliance models list` shows the installed models and "
                         "`appliance models pull` adds one", param="model")
