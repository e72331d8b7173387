"""Pulls started from the API (`POST /api/models/pull`): each runs `ModelRegistry.pull` in a thread of its own with
its own database connection, as `appliance models pull` runs in a process of its own, under the same source policy
and with the same audit records. A job tells its live byte progress and ends `done` (the model and its version: a
name that exists gets a new version in staging) or `failed` (the error's message)."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from appliance.audit import AuditLog
from appliance.errors import ApplianceError, NotFound
from appliance.logs import get_logger
from appliance.registry.catalog import Catalog
from appliance.registry.service import ModelRegistry
from appliance.registry.sources import ImportPolicy
from appliance.registry.store import ModelStore

log = get_logger(__name__)
KEEP_FINISHED = 100  # finished jobs remembered (the newest), for clients that poll late


@dataclass
class PullJob:
    id: str
    source: str
    name: str | None = None
    status: Literal["running", "done", "failed"] = "running"
    bytes: int = 0
    total: int | None = None
    model: str | None = None
    version: int | None = None
    error: str | None = None

    def progress(self, seen: int, total: int | None) -> None:
        self.bytes, self.total = seen, total

    def to_dict(self) -> dict[str, Any]:
        return {"object": "model.pull", "id": self.id, "status": self.status, "source": self.source,
                "bytes": self.bytes, "total": self.total, "model": self.model, "version": self.version,
                "error": self.error}


class ModelPulls:
    def __init__(self, connect: Callable[[], sqlite3.Connection], store: ModelStore, catalog: Catalog,
                 policy: ImportPolicy, audit: AuditLog) -> None:
        """`connect` opens a database connection of the job's own; `audit` is the app's log, whose privacy scrub the
        job's log uses too."""
        self.connect = connect
        self.store = store
        self.catalog = catalog
        self.policy = policy
        self.audit = audit
        self._jobs: dict[str, PullJob] = {}
        self._lock = threading.Lock()

    def start(self, source: str, name: str | None, *, actor: str) -> PullJob:
        job = PullJob("pull_" + secrets.token_hex(8), source, name)
        with self._lock:
            finished = [j.id for j in self._jobs.values() if j.status != "running"]
            for old in finished[: max(0, len(finished) - KEEP_FINISHED + 1)]:
                del self._jobs[old]
            self._jobs[job.id] = job
        threading.Thread(target=self._run, args=(job, actor), name=job.id, daemon=True).start()
        return job

    def get(self, job_id: str) -> PullJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no model pull {job_id[:40]!r}; POST /api/models/pull starts one", param="id")
        return job

    @contextlib.contextmanager
    def _registry(self) -> Iterator[ModelRegistry]:
        conn = self.connect()
        try:
            audit = AuditLog(conn)
            audit.scrub = self.audit.scrub  # the privacy policy's audit surface, as on the app's own log
            yield ModelRegistry(conn, self.store, self.catalog, audit=audit, policy=self.policy)
        finally:
            conn.close()

    def _run(self, job: PullJob, actor: str) -> None:
        try:
            with self._registry() as registry:
                record = registry.pull(job.source, job.name, actor=actor, progress=job.progress)
                version = registry.versions.with_digest(record.name, record.sha256)
            job.model, job.version = record.name, version.version if version is not None else None
            job.status = "done"
        except ApplianceError as exc:
            job.error, job.status = exc.message, "failed"
        except Exception as exc:  # a thread's error has nowhere else to go: the job tells it
            log.exception("model.pull_failed", job=job.id)
            job.error, job.status = f"the pull failed ({type(exc).__name__}: {exc}); see the server log", "failed"
