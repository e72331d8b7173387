"""The RAG service runs the index's blocking work on a few threads of its own (`INDEX_THREADS`), not on asyncio's
default executor: every thread that touches the index keeps a SQLite connection with its own page and statement
caches, so the number of threads bounds the memory those caches hold (the soak of issue 18)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from pathlib import Path

import pytest

from appliance.config import RagSettings
from appliance.rag.index import RagIndex
from appliance.rag.service import INDEX_THREADS, RagService

REQUEST = contextvars.ContextVar("request", default="none")


def test_index_work_runs_on_a_bounded_set_of_threads_in_the_callers_context(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []  # the thread of every SQLite connection the index opens
    connection = RagIndex._connection

    def recording(index: RagIndex) -> object:
        if getattr(index._local, "conn", None) is None:
            opened.append(threading.current_thread().name)
        return connection(index)

    monkeypatch.setattr(RagIndex, "_connection", recording)
    rag = RagService(RagSettings(), tmp_path / "rag", embeddings=None, rbac=None, metrics=None)  # type: ignore[arg-type]
    collection = rag.index.create_collection("notes", "user:u1", [], [], "test-model")
    opened.clear()  # the one that created the schema, on this thread
    gate = threading.Barrier(INDEX_THREADS, timeout=30)  # every index thread busy at once

    def search() -> tuple[str, str, int]:
        gate.wait()
        hits = rag.index.keyword_search([collection["id"]], "river", 5)
        return threading.current_thread().name, REQUEST.get(), len(hits)

    async def one(n: int) -> tuple[str, str, int]:
        REQUEST.set(f"r{n}")
        return await rag._thread(search)

    async def many() -> list[tuple[str, str, int]]:
        return await asyncio.gather(*(one(n) for n in range(INDEX_THREADS * 4)))

    try:
        results = asyncio.run(many())
        report = asyncio.run(rag.check(repair=False))
    finally:
        rag.close()
    threads = {name for name, _, _ in results}
    assert len(threads) == INDEX_THREADS and all(name.startswith("rag") for name in threads)
    assert [request for _, request, _ in results] == [f"r{n}" for n in range(INDEX_THREADS * 4)]  # its context
    assert all(hits == 0 for _, _, hits in results)
    assert report is not None
    assert len(opened) == INDEX_THREADS and set(opened) == threads  # `check` reused one of them
