"""Ingestion jobs in SQLite (appliance.rag.jobs, migration 16): what a job carries survives until it ends, its
progress is kept, interrupted jobs come back counted; under the privacy policy (`uploads`) finished jobs go by age
and an erasure takes a subject's jobs, running ones with their documents."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.config import RagSettings
from appliance.privacy.retention import Subject
from appliance.rag.jobs import MAX_ATTEMPTS, Incoming, IngestionJobStore, Job, JobStore
from appliance.rag.service import RagService


def test_a_job_and_its_documents_come_back_after_a_restart(conn: sqlite3.Connection) -> None:
    store = JobStore(conn)
    documents = [Incoming("a", b"\x00binary\xff", "pdf", {"source": "scan"}), Incoming("b", b"# B", "markdown")]
    job = Job("j1", "user:u1", "notes", "2 documents")
    store.add(job, "c1", "key:k1", documents)
    job.state, job.stage, job.done, job.total = "running", "embedding", 8, 20
    store.save(job)
    assert store.find("j1") == job  # progress is kept as it goes

    [first] = JobStore(conn).interrupted()  # as a new process finds it
    assert (first.job.id, first.collection_id, first.actor, first.attempts) == ("j1", "c1", "key:k1", 2)
    assert first.documents == documents
    assert JobStore(conn).interrupted()[0].attempts == 3  # each start counts

    job.state, job.stage = "done", "done"
    store.save(job)
    assert store.interrupted() == []
    assert conn.execute("SELECT documents FROM ingestion_jobs").fetchone()[0] is None  # dropped once finished
    assert store.find("j1") == job and store.find("nope") is None


def test_retention_takes_finished_jobs_by_age_and_erasure_takes_a_subjects_jobs(conn: sqlite3.Connection) -> None:
    store, privacy = JobStore(conn), IngestionJobStore(conn)
    for job_id, owner, state in [("done", "user:u1", "done"), ("running", "user:u1", "running"),
                                 ("other", "user:u2", "failed")]:
        job = Job(job_id, owner, "notes", "doc")
        store.add(job, "c1", owner, [Incoming("doc", b"a canary document", "text")])
        job.state = state  # type: ignore[assignment]
        store.save(job)
    later = datetime.now(UTC) + timedelta(days=1)
    assert privacy.count_older_than(later) == 2 and privacy.report().count == 3
    assert privacy.purge_older_than(datetime.now(UTC) - timedelta(days=1)) == 0  # young: kept
    assert privacy.purge_older_than(later) == 2  # finished ones go; the running one stays
    assert [i.job.id for i in store.interrupted()] == ["running"]
    assert privacy.erase_subject(Subject("alice", user_id="u1")) == 1  # documents and all
    assert conn.execute("SELECT COUNT(*) FROM ingestion_jobs").fetchone()[0] == 0


def test_jobs_that_cannot_run_again_fail_with_the_reason(conn: sqlite3.Connection, tmp_path: Path) -> None:
    """At start: a job whose collection was deleted (or replaced by another of the same name) and a job the server
    kept dying in are marked failed with a reason a person can act on; nothing is started."""
    rag = RagService(RagSettings(), tmp_path / "rag", embeddings=None, rbac=None, metrics=None)  # type: ignore[arg-type]
    rag.job_store = store = JobStore(conn)
    kept = rag.index.create_collection("kept", "user:u1", [], [], "test-model")
    store.add(Job("gone", "user:u1", "deleted", "a"), "c-deleted", "key:k1", [Incoming("a", b"x", "text")])
    store.add(Job("replaced", "user:u1", "kept", "b"), "c-older", "key:k1", [Incoming("b", b"x", "text")])
    store.add(Job("dying", "user:u1", "kept", "c"), kept["id"], "key:k1", [Incoming("c", b"x", "text")])
    conn.execute("UPDATE ingestion_jobs SET attempts = ? WHERE id = 'dying'", (MAX_ATTEMPTS,))
    try:
        assert asyncio.run(rag.resume_jobs()) == []
        failed = {job_id: store.find(job_id) for job_id in ("gone", "replaced", "dying")}
        assert all(job is not None and job.state == "failed" for job in failed.values())
        errors = {job_id: job.error for job_id, job in failed.items() if job is not None and job.error}
        assert errors["gone"]["code"] == errors["replaced"]["code"] == "collection_not_found"
        assert "was deleted while the server was stopped" in errors["gone"]["message"]
        assert errors["dying"]["code"] == "ingestion_interrupted" and "3 times" in errors["dying"]["message"]
        assert rag.jobs == {}  # nothing started
        assert conn.execute("SELECT COUNT(*) FROM ingestion_jobs WHERE documents IS NOT NULL").fetchone()[0] == 0
    finally:
        rag.close()
