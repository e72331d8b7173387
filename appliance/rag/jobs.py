"""Ingestion jobs that outlive the server (migration 16's `ingestion_jobs`): a job is written, with the documents
it carries, before its 202 is sent; its progress is written as it goes; the documents are dropped once it ends
(done or failed), the row stays for `GET /api/jobs/{id}` until the privacy policy's `uploads` retention removes it
(`IngestionJobStore`; an erasure removes a subject's jobs, documents and all). At start, jobs a stop or crash
interrupted run again from the start (re-adding a document replaces it), up to `MAX_ATTEMPTS` starts; after
that, or when their collection is gone, they are marked failed with the reason."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from appliance.privacy.retention import StoreReport, Subject, compact_sqlite
from appliance.rag.parsers import Kind

MAX_ATTEMPTS = 3


@dataclass
class Job:
    id: str
    owner: str
    collection: str
    document_id: str
    state: Literal["queued", "running", "done", "failed"] = "queued"
    stage: str = "queued"
    done: int = 0
    total: int = 0
    error: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)

    def view(self) -> dict[str, Any]:
        progress = round(self.done / self.total, 3) if self.total else (1.0 if self.state == "done" else 0.0)
        return {"id": self.id, "object": "ingestion.job", "state": self.state, "stage": self.stage,
                "collection": self.collection, "document_id": self.document_id, "done": self.done,
                "total": self.total, "progress": progress, "error": self.error}

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


@dataclass(frozen=True)
class Incoming:
    """A document as it arrives: its id, bytes, format and metadata."""

    id: str
    data: bytes
    kind: Kind
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Interrupted:
    """A job to run again: what it carries, for whom, and how many times it was started."""

    job: Job
    collection_id: str
    actor: str
    attempts: int
    documents: list[Incoming]


def failure(message: str, code: str) -> dict[str, Any]:
    return {"message": message, "type": "server_error", "param": None, "code": code}


class JobStore:
    """The `ingestion_jobs` table, on the connection of the event loop (small writes: a row per progress step)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def add(self, job: Job, collection_id: str, actor: str, documents: Sequence[Incoming]) -> None:
        payload = msgspec.msgpack.encode(list(documents))
        self.conn.execute(
            "INSERT INTO ingestion_jobs (id, owner, actor, collection, collection_id, document_id, state, stage, "
            "done, total, error, documents, attempts, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, 1, ?)",
            (job.id, job.owner, actor, job.collection, collection_id, job.document_id, job.state, job.stage,
             job.done, job.total, payload, job.created))

    def save(self, job: Job) -> None:
        """Its state and progress; a finished job's documents go."""
        self.conn.execute(
            "UPDATE ingestion_jobs SET state = ?, stage = ?, done = ?, total = ?, error = ?, "
            "documents = CASE WHEN ? THEN NULL ELSE documents END WHERE id = ?",
            (job.state, job.stage, job.done, job.total, json.dumps(job.error) if job.error else None, job.finished,
             job.id))

    def find(self, job_id: str) -> Job | None:
        row = self.conn.execute("SELECT * FROM ingestion_jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def interrupted(self) -> list[Interrupted]:
        """Jobs that were queued or running when the server stopped, oldest first, each counted as started again."""
        rows = self.conn.execute("SELECT * FROM ingestion_jobs WHERE state IN ('queued', 'running') "
                                 "ORDER BY created").fetchall()
        found = []
        for row in rows:
            self.conn.execute("UPDATE ingestion_jobs SET attempts = attempts + 1 WHERE id = ?", (row["id"],))
            documents = msgspec.msgpack.decode(row["documents"], type=list[Incoming]) if row["documents"] else []
            found.append(Interrupted(_job(row), row["collection_id"], row["actor"], row["attempts"] + 1, documents))
        return found



class IngestionJobStore:
    """Ingestion jobs under the privacy policy (`appliance.privacy.retention.ErasableStore`, data class
    `uploads`): finished jobs go by age; an erasure removes every job a subject sent, with the documents a running
    one still carries."""

    data_class = "uploads"
    _FINISHED = "state IN ('done', 'failed') AND created < ?"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def purge_older_than(self, cutoff: datetime) -> int:
        return self.conn.execute(f"DELETE FROM ingestion_jobs WHERE {self._FINISHED}",  # noqa: S608
                                 (cutoff.timestamp(),)).rowcount

    def count_older_than(self, cutoff: datetime) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM ingestion_jobs WHERE {self._FINISHED}",  # noqa: S608
                                     (cutoff.timestamp(),)).fetchone()[0])

    def erase_subject(self, subject: Subject) -> int:
        ids = sorted(subject.principals)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        return self.conn.execute(f"DELETE FROM ingestion_jobs WHERE owner IN ({marks}) OR actor IN ({marks})",  # noqa: S608
                                 [*ids, *ids]).rowcount

    def report(self) -> StoreReport:
        count, oldest = self.conn.execute("SELECT COUNT(*), MIN(created) FROM ingestion_jobs").fetchone()
        return StoreReport(self.data_class, count, datetime.fromtimestamp(oldest, UTC) if oldest else None,
                           "RAG ingestion jobs and the documents a running one carries")

    def compact(self) -> None:
        compact_sqlite(self.conn)


def _job(row: sqlite3.Row) -> Job:
    return Job(row["id"], row["owner"], row["collection"], row["document_id"], row["state"], row["stage"],
               row["done"], row["total"], json.loads(row["error"]) if row["error"] else None, row["created"])
