"""Ingestion jobs in SQLite (appliance.rag.jobs, migration 14): what a job carries survives until it ends, its
progress is kept, interrupted jobs come back counted, finished ones are forgotten after a week."""

from __future__ import annotations

import sqlite3
import time

from appliance.rag.jobs import KEEP_FINISHED, Incoming, Job, JobStore


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
    assert store.forget_finished(now=time.time()) == 0
    assert store.forget_finished(now=time.time() + KEEP_FINISHED.total_seconds() + 1) == 1
    assert store.find("j1") is None
