"""RAG as the API sees it: collections with owners and sharing, documents in and out, retrieval in three modes,
ingestion jobs. No HTTP in here; every call names the principal it acts for.

Who may use a collection: its owner (the user behind a key or session, else the key itself), the subjects in its
`readers` / `writers` (`user:ID`, `key:ID`, `role:NAME` or `*`), and any role that grants `rag:admin`. A key
created with `--collections` is narrowed to those names. A collection the caller may not read answers exactly like
one that does not exist (404), so its existence is not revealed."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import numpy as np

from appliance.audit import AuditLog
from appliance.auth.guards import effective_permissions
from appliance.auth.rbac import Rbac
from appliance.config import RagSettings
from appliance.errors import ApplianceError, Forbidden, InvalidRequest, NotFound
from appliance.logs import get_logger
from appliance.observability.metrics import Metrics
from appliance.privacy.actions import Placeholders
from appliance.privacy.service import Privacy
from appliance.rag.chunking import Chunk, chunk_blocks
from appliance.rag.embeddings import EmbeddingService
from appliance.rag.index import CheckReport, Hit, NewDocument, RagIndex, StoredChunk
from appliance.rag.jobs import MAX_ATTEMPTS, Incoming, Job, JobStore, failure
from appliance.rag.parsers import Block, Kind, parse
from appliance.rag.vectors import RETRY_AFTER, ChromaServer, ServerProbe, VectorStoreUnavailable

log = get_logger(__name__)

T = TypeVar("T")
INDEX_THREADS = 4  # reads run side by side (SQLite WAL, Chroma); writes take the index's lock one at a time
Mode = Literal["hybrid", "vector", "keyword"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_SUBJECT = re.compile(r"^(\*|(user|key|role):[A-Za-z0-9._-]{1,64})$")


class Conflict(ApplianceError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class TooLarge(InvalidRequest):
    status_code = 413
    code = "document_too_large"


def owner_of(principal: Any) -> str:
    """The subject that owns what a principal creates: the user behind a key or session, else the key."""
    owner_user = getattr(principal, "owner_user_id", None)
    return f"user:{owner_user}" if owner_user else str(principal.subject)


def name_unavailable(name: str) -> Conflict:
    """The answer for a name held by a collection the caller may not see (or one being deleted): it says the name
    can't be had, never that a collection has it, whose it is, or anything else about it."""
    return Conflict(f"the name '{name}' is not available for a new collection; pick another name", param="name",
                    code="name_unavailable")


def collection_not_found(name: str) -> NotFound:
    return NotFound(f"collection '{name}' does not exist; GET /api/collections lists the ones you may use",
                    code="collection_not_found", param="collection")


@dataclass(frozen=True)
class Result:
    chunk: StoredChunk
    collection: str
    score: float

    def view(self) -> dict[str, Any]:
        c = self.chunk
        return {"document_id": c.document_id, "chunk_id": c.chunk_id, "text": c.text, "score": round(self.score, 6),
                "collection": self.collection, "heading": c.heading, "position": c.position}


class RagService:
    def __init__(self, settings: RagSettings, root: Path, embeddings: EmbeddingService, rbac: Rbac,
                 metrics: Metrics, audit: AuditLog | None = None, repair_on_open: bool = True,
                 server: ChromaServer | None = None) -> None:
        self.settings = settings
        self.root = root
        self.server = server  # a Chroma server holds the vectors; None: embedded Chroma
        self.probe = ServerProbe(server) if server else None
        self.repair_on_open = repair_on_open
        self._index: RagIndex | None = None
        self._opening = threading.Lock()
        self.embeddings = embeddings
        self.rbac = rbac
        self.metrics = metrics
        self.audit = audit
        self.jobs: dict[str, Job] = {}  # the jobs this process runs; `job_store` keeps every job (the server's)
        self.job_store: JobStore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.crash_hook: Callable[[str], None] | None = None  # tests: kill the process at a named step
        self.privacy: Privacy | None = None  # the `rag` surface of the privacy policy, applied at ingestion
        # The index's work runs on threads of its own, not on asyncio's default executor (up to 32 threads): each
        # thread that touches the index holds its own SQLite connection, with its page and statement caches.
        self._threads = ThreadPoolExecutor(max_workers=INDEX_THREADS, thread_name_prefix="rag")

    @property
    def index(self) -> RagIndex:
        """The indexes, opened on first use (Chroma's import is slow), finishing what a crash interrupted."""
        with self._opening:
            if self._index is None:
                index = RagIndex(self.root, self.server)
                if index.moved_from:
                    log.warning("rag.vector_store_changed", before=index.moved_from,
                                hint="the vectors are not in the new store yet: `appliance rag check --repair` (server "
                                     "stopped) or POST /api/rag/check?repair=true re-embeds every document into it")
                removed = []
                if self.repair_on_open:
                    try:
                        removed = index.repair_unfinished()
                    except VectorStoreUnavailable as exc:  # repaired once the server answers (watch_vectors)
                        log.warning("rag.repair_deferred", why=exc.message)
                if removed:
                    log.warning("rag.repaired", removed=removed, why="the server stopped during ingestion")
                self._index = index
            return self._index

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _thread(self, fn: Callable[..., T], /, *args: Any) -> T:
        """`fn(*args)` on one of the index's threads, in this task's context (as `asyncio.to_thread`)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._threads, call)

    # the Chroma server

    async def vectors_ready(self) -> bool:
        """Whether the vectors can be reached: always with embedded Chroma, else the server's heartbeat."""
        return self.probe is None or await self._thread(self.probe.up)

    async def watch_vectors(self, every: float = RETRY_AFTER) -> None:
        """With a Chroma server: finish what an unreachable server left unfinished (pending documents, deleting
        collections) as soon as it answers again, as the start does after a crash."""
        if self.probe is None:
            return
        while True:
            await asyncio.sleep(every)
            index = self._index
            if index is None or not await self._thread(index.unfinished) or not await self.vectors_ready():
                continue
            try:
                removed = await self._thread(index.repair_unfinished)
            except VectorStoreUnavailable:
                self._lost_server()
                continue
            if removed:
                log.warning("rag.repaired", removed=removed, why="the Chroma server was unreachable during a change")

    def _lost_server(self) -> None:
        if self.probe is not None:
            self.probe.saw(False)

    # access

    def _is_admin(self, principal: Any) -> bool:
        return "rag:admin" in effective_permissions(principal, self.rbac)

    def _may(self, principal: Any, collection: dict[str, Any], write: bool) -> bool:
        narrowed: tuple[str, ...] | None = getattr(principal, "collections", None)
        if narrowed is not None and collection["name"] not in narrowed:
            return False
        if self._is_admin(principal) or collection["owner"] == owner_of(principal):
            return True
        mine = {"*", owner_of(principal), str(principal.subject), f"role:{principal.role}"}
        allowed = set(collection["writers"]) | (set() if write else set(collection["readers"]))
        return bool(mine & allowed)

    def _collection(self, principal: Any, name: str, write: bool = False) -> dict[str, Any]:
        collection = self.index.collection(name)
        if collection is None or not self._may(principal, collection, write=False):
            raise collection_not_found(name)
        if write and not self._may(principal, collection, write=True):
            raise Forbidden(f"you may read collection '{name}' but not change it; ask its owner to add you to "
                            "its writers", code="collection_read_only")
        return collection

    def _record(self, principal: Any, action: str, target: str, **details: Any) -> None:
        self._record_as(str(principal.subject), action, target, **details)

    def _record_as(self, actor: str, action: str, target: str, **details: Any) -> None:
        if self.audit is not None:
            self.audit.record(actor, action, target[:200], "ok", **details)

    # collections

    async def create_collection(self, principal: Any, name: str, readers: Sequence[str] = (),
                                writers: Sequence[str] = ()) -> dict[str, Any]:
        if not _NAME.match(name):
            raise InvalidRequest(f"collection name {name!r} is not valid: use 1-63 letters, digits, '.', '_' or "
                                 "'-', starting with a letter or digit", param="name", code="invalid_value")
        for subject in (*readers, *writers):
            if not _SUBJECT.match(subject):
                raise InvalidRequest(f"{subject!r} is not a subject: use user:ID, key:ID, role:NAME or *",
                                     param="readers", code="invalid_value")
        # Names are one namespace: a taken name can't be had, but only a caller who may see the collection is told
        # that it exists; anyone else gets the same answer as for a name held by a collection being deleted.
        taken = self.index.collection(name)
        if taken is not None and self._may(principal, taken, write=False):
            raise Conflict(f"a collection named '{name}' exists already; pick another name", param="name")
        if taken is not None:
            raise name_unavailable(name)
        try:
            collection = await self._thread(self.index.create_collection, name, owner_of(principal), readers,
                                                 writers, self.embeddings.version)
        except sqlite3.IntegrityError:  # a collection being deleted still holds it, or a create that just won
            raise name_unavailable(name) from None
        self._record(principal, "rag.collection.create", name, readers=len(readers), writers=len(writers))
        return self._view(collection)

    def list_collections(self, principal: Any) -> list[dict[str, Any]]:
        return [self._view(c) for c in self.index.collections() if self._may(principal, c, write=False)]

    async def delete_collection(self, principal: Any, name: str) -> None:
        collection = self._collection(principal, name)
        if not (self._is_admin(principal) or collection["owner"] == owner_of(principal)):
            raise Forbidden(f"only the owner of collection '{name}' or an admin may delete it",
                            code="not_collection_owner")
        await self._thread(self.index.delete_collection, collection["id"])
        self._record(principal, "rag.collection.delete", name)

    def versions(self, principal: Any, names: Sequence[str]) -> dict[str, int]:
        """Each collection's version (it changes with every document added or deleted), for cache keys."""
        return {name: int(self._collection(principal, name)["version"]) for name in names}

    @staticmethod
    def _view(collection: dict[str, Any]) -> dict[str, Any]:
        keys = ("name", "owner", "readers", "writers", "version", "embedding_model", "created_at", "documents")
        return {"object": "collection", **{k: collection[k] for k in keys if k in collection}}

    # documents

    async def add_document(self, principal: Any, name: str, document_id: str, data: bytes, kind: Kind,
                           metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """One document: ingested now, or as a job when large; returns the document or the job."""
        return await self.add_documents(principal, name, [Incoming(document_id, data, kind, metadata or {})])

    async def add_documents(self, principal: Any, name: str, documents: Sequence[Incoming]) -> dict[str, Any]:
        """Documents embedded together (one pass, full batches) and written to both indexes together; a job when
        their size passes rag.job_threshold_bytes."""
        collection = self._collection(principal, name, write=True)
        if not documents:
            raise InvalidRequest("no documents to add", param="documents", code="invalid_value")
        if len({d.id for d in documents}) != len(documents):
            raise InvalidRequest("a document id appears twice in one request", param="documents",
                                 code="invalid_value")
        for d in documents:
            _check_document_id(d.id)
            if len(d.data) > self.settings.max_document_bytes:
                raise TooLarge(f"document '{d.id}' is {len(d.data)} bytes; the limit is "
                               f"{self.settings.max_document_bytes} (rag.max_document_bytes): split it or raise it")
            if not d.data.strip():
                raise InvalidRequest(f"document '{d.id}' is empty", param="text", code="invalid_value")
        label = documents[0].id if len(documents) == 1 else f"{len(documents)} documents"
        job = Job(uuid.uuid4().hex, owner_of(principal), name, label)
        if sum(len(d.data) for d in documents) <= self.settings.job_threshold_bytes:
            await self._ingest(job, str(principal.subject), collection, documents)
            if len(documents) == 1:
                return {"object": "document", "id": documents[0].id, "collection": name, "chunks": job.total}
            return {"object": "list", "collection": name, "data": [{"object": "document", "id": d.id}
                                                                    for d in documents], "chunks": job.total}
        if self.job_store is not None:  # written before the 202: an acknowledged job survives a restart
            self.job_store.add(job, collection["id"], str(principal.subject), documents)
        self._start_job(job, str(principal.subject), collection, documents)
        return job.view()

    def _start_job(self, job: Job, actor: str, collection: dict[str, Any], documents: Sequence[Incoming]) -> None:
        self.jobs[job.id] = job
        task = asyncio.create_task(self._run_job(job, actor, collection, documents))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _save(self, job: Job) -> None:
        if self.job_store is not None:
            self.job_store.save(job)

    async def _run_job(self, job: Job, actor: str, collection: dict[str, Any],
                       documents: Sequence[Incoming]) -> None:
        try:
            await self._ingest(job, actor, collection, documents)
        except ApplianceError as exc:
            job.state, job.error = "failed", exc.to_body()["error"]
        except Exception as exc:
            log.exception("rag.job_failed", job=job.id)
            job.state = "failed"
            job.error = failure(f"ingestion failed ({type(exc).__name__}); see the server log", "ingestion_failed")
        self._save(job)

    async def resume_jobs(self) -> list[str]:
        """Run again the jobs a stop or crash interrupted (after the index has repaired what they left), or mark
        them failed with the reason; returns their ids. Called once at server start."""
        if self.job_store is None:
            return []
        index = await self._thread(lambda: self.index)
        resumed = []
        for found in self.job_store.interrupted():
            job = found.job
            collection = await self._thread(index.collection, job.collection)
            if collection is None or collection["id"] != found.collection_id:
                job.state, job.error = "failed", failure(
                    f"collection '{job.collection}' was deleted while the server was stopped; nothing was added",
                    "collection_not_found")
            elif found.attempts > MAX_ATTEMPTS:
                job.state, job.error = "failed", failure(
                    f"the server stopped during this job {MAX_ATTEMPTS} times; send the documents again in smaller "
                    "parts or see the server log", "ingestion_interrupted")
            else:
                job.state, job.stage, job.done, job.total = "queued", "queued", 0, 0
                self._save(job)
                self._start_job(job, found.actor, collection, found.documents)
                resumed.append(job.id)
                continue
            self._save(job)
            log.warning("rag.job_not_resumed", job=job.id, reason=job.error["message"] if job.error else "")
        if resumed:
            log.info("rag.jobs_resumed", jobs=resumed, why="the server stopped while they ran")
        return resumed

    async def _ingest(self, job: Job, actor: str, collection: dict[str, Any],
                      documents: Sequence[Incoming]) -> None:
        s = self.settings
        job.state, job.stage = "running", "parsing"
        self._save(job)
        chunked: list[list[Chunk]] = []
        for d in documents:
            blocks: list[Block] = await self._thread(parse, d.data, d.kind, f"document '{d.id}'")
            if self.privacy is not None and not self.privacy.passes_everything("rag"):
                blocks = await self._thread(_apply_policy, self.privacy, blocks, d.id)
            chunks = await self.embeddings.run(chunk_blocks, blocks, self.embeddings.model, s.chunk_tokens,
                                               s.chunk_overlap)
            if not chunks:
                raise InvalidRequest(f"document '{d.id}' has no text to index", code="invalid_document")
            chunked.append(chunks)
        texts = [c.indexed_text for chunks in chunked for c in chunks]
        job.stage, job.total = "embedding", len(texts)
        self._save(job)
        parts = []
        step = s.embedding_batch * 8
        for start in range(0, len(texts), step):
            parts.append((await self.embeddings.embed(texts[start : start + step])).vectors)
            job.done = min(start + step, len(texts))
            self._save(job)
        vectors = np.vstack(parts)
        ready = []
        offset = 0
        for d, chunks in zip(documents, chunked, strict=True):
            ready.append(NewDocument(d.id, chunks, vectors[offset : offset + len(chunks)], d.metadata, len(d.data)))
            offset += len(chunks)
        job.stage = "indexing"
        self._save(job)
        await self._put(job, collection["id"], ready, job.owner, retry=job.id in self.jobs)
        self.metrics.rag_chunks.inc(len(texts))
        job.state, job.stage = "done", "done"
        for added in ready:
            self._record_as(actor, "rag.document.add", f"{collection['name']}/{added.id}", chunks=len(added.chunks))

    async def _put(self, job: Job, collection_id: str, ready: Sequence[NewDocument], added_by: str,
                   retry: bool) -> None:
        """Write to both indexes. A job retries while the Chroma server is unreachable (its view shows the 503 it
        got and the stage `waiting for the vector store`), for up to rag.chroma_retry_seconds; a request that is
        not a job gets the 503 at once. Writing again is safe: put_documents replaces a document's vectors."""
        deadline = time.monotonic() + self.settings.chroma_retry_seconds
        attempt = 0
        while True:
            try:
                await self._thread(self.index.put_documents, collection_id, ready, added_by, self.crash_hook)
                job.error = None
                return
            except VectorStoreUnavailable as exc:
                self._lost_server()
                attempt += 1
                if not retry or time.monotonic() >= deadline:
                    raise
                job.stage, job.error = "waiting for the vector store", exc.to_body()["error"]
                self._save(job)
                log.warning("rag.job_waiting", job=job.id, attempt=attempt, why=exc.message)
                await asyncio.sleep(min(0.5 * 2 ** attempt, RETRY_AFTER))
            job.stage = "indexing"

    async def delete_document(self, principal: Any, name: str, document_id: str) -> None:
        collection = self._collection(principal, name, write=True)
        if not await self._thread(self._delete_and_compact, collection["id"], document_id):
            raise NotFound(f"collection '{name}' has no document '{document_id}'", code="document_not_found",
                           param="document_id")
        self._record(principal, "rag.document.delete", f"{name}/{document_id}")

    def _delete_and_compact(self, collection_id: str, document_id: str) -> bool:
        """Delete, then compact, so the deleted text leaves no trace on disk at once (privacy: a delete is an
        erasure; the cost grows with the index, about a second per 100k chunks)."""
        try:
            deleted = self.index.delete_document(collection_id, document_id)
        except VectorStoreUnavailable:  # the text is gone from the keyword index: compact it away all the same
            self.index.compact()
            raise
        if deleted:
            self.index.compact()
        return deleted

    def list_documents(self, principal: Any, name: str) -> list[dict[str, Any]]:
        return self.index.documents(self._collection(principal, name)["id"])

    def job(self, principal: Any, job_id: str) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None and self.job_store is not None:
            job = self.job_store.find(job_id)
        if job is None or (job.owner != owner_of(principal) and not self._is_admin(principal)):
            raise NotFound(f"no ingestion job '{job_id}' (finished jobs are kept for the privacy policy's `uploads` "
                           "retention)", code="job_not_found")
        return job.view()

    # retrieval

    async def query(self, principal: Any, names: Sequence[str], query: str, top_k: int = 5, mode: Mode = "hybrid",
                    per_document: int = 1) -> list[Result]:
        if not query.strip():
            raise InvalidRequest("'query' is empty", param="query", code="invalid_value")
        if not 1 <= top_k <= self.settings.top_k_max:
            raise InvalidRequest(f"top_k must be between 1 and {self.settings.top_k_max}", param="top_k",
                                 code="invalid_value")
        collections = {c["id"]: c["name"] for c in (self._collection(principal, n) for n in names)}
        started = time.perf_counter()
        depth = max(top_k * 5 * per_document, 50)
        ids = list(collections)

        async def by_keyword() -> list[Hit]:
            if mode == "vector":
                return []
            return await self._thread(self.index.keyword_search, ids, query, depth)

        async def by_vector() -> list[Hit]:
            if mode == "keyword":
                return []
            embedded = await self.embeddings.embed([query])
            return await self._thread(self.index.vector_search, ids, embedded.vectors[0], depth)

        # side by side: SQLite, torch and Chroma release the GIL, so hybrid costs about the slower of the two
        try:
            keyword, vector = await asyncio.gather(by_keyword(), by_vector())
        except VectorStoreUnavailable:
            self._lost_server()
            raise
        ranked = fuse([keyword, vector]) if mode == "hybrid" else (keyword or vector)
        picked = _per_document(ranked, top_k, per_document, await self._thread(
            self.index.chunks, [h.chunk_key for h in ranked[: depth * 2]]))
        self.metrics.rag_query_seconds.labels(mode).observe(time.perf_counter() - started)
        return [Result(chunk, collections[chunk.collection_id], score) for chunk, score in picked]

    async def check(self, repair: bool) -> CheckReport:
        def embed(texts: list[str]) -> Any:
            return self.embeddings.embed_sync(texts).vectors

        return await self._thread(self.index.check, repair, embed)


def _apply_policy(privacy: Privacy, blocks: Sequence[Block], document_id: str) -> list[Block]:
    """The privacy policy's `rag` surface on a document's text: its entities redacted, masked or pseudonymized
    (one numbering for the whole document) before anything is indexed, or the document refused (422)."""
    marks = Placeholders()
    where = f"document '{document_id}'"
    return [Block(tuple(privacy.enforce("rag", h, marks, where) for h in b.headings),
                  privacy.enforce("rag", b.text, marks, where)) for b in blocks]


def fuse(rankings: Sequence[Sequence[Hit]]) -> list[Hit]:
    """Score fusion over chunks: each retriever's scores become z-scores over its own candidates, shifted so that its
    weakest candidate counts 0 (as a chunk it did not find), and a chunk scores the sum. Unlike reciprocal rank
    fusion, a retriever that is sure (one passage far above the rest) outweighs one that is not; with RRF a weaker
    retriever's ranks pulled hybrid below keyword alone on long documents (issue 15). A retriever whose candidates
    all score the same gives each of them 1."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        if not ranking:
            continue
        values = np.array([hit.score for hit in ranking], dtype=np.float64)
        spread = float(values.std())
        normal = (values - values.min()) / spread if spread > 0 else np.ones(len(values))
        for hit, value in zip(ranking, normal, strict=True):
            scores[hit.chunk_key] = scores.get(hit.chunk_key, 0.0) + float(value)
    return [Hit(key, score) for key, score in sorted(scores.items(), key=lambda kv: -kv[1])]


def _per_document(ranked: Sequence[Hit], top_k: int, per_document: int, chunks: dict[int, StoredChunk]
                  ) -> list[tuple[StoredChunk, float]]:
    taken: dict[tuple[str, str], int] = {}
    out = []
    for hit in ranked:
        chunk = chunks.get(hit.chunk_key)
        if chunk is None:
            continue
        doc = (chunk.collection_id, chunk.document_id)
        if taken.get(doc, 0) >= per_document:
            continue
        taken[doc] = taken.get(doc, 0) + 1
        out.append((chunk, hit.score))
        if len(out) == top_k:
            break
    return out


def _check_document_id(document_id: str) -> None:
    if not document_id or len(document_id) > 256 or any(ord(ch) < 32 for ch in document_id):
        raise InvalidRequest("a document id must be 1-256 printable characters", param="id", code="invalid_value")


class NewCollection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    readers: list[str] = msgspec.field(default_factory=list)
    writers: list[str] = msgspec.field(default_factory=list)


class DocumentBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    text: str
    metadata: dict[str, str | int | float | bool | None] = msgspec.field(default_factory=dict)
    format: Literal["text", "markdown", "html"] = "text"


class DocumentBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    documents: Annotated[list[DocumentBody], msgspec.Meta(min_length=1, max_length=10_000)]


class QueryRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    query: str
    top_k: int = 5
    mode: Mode = "hybrid"
    per_document: int = 1
