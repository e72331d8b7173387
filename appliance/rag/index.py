"""The two indexes of RAG kept as one: Chroma (vectors, HNSW, cosine) and a SQLite FTS5 keyword index (BM25) over
the same chunks, with the collections and documents that own them, in `<data_dir>/rag/`.

Consistency between the two stores, which cannot share a transaction, is a small journal in SQLite: a document is
marked `pending` before Chroma is touched and `ready` in the same transaction that writes its keyword rows, and a
deletion is marked `deleting` first. After a crash (kill -9 mid-ingestion) `repair()` removes every pending or
deleting document from both stores, so each document is either fully present or absent; `check()` also compares
the chunk ids of both stores and re-embeds chunks whose vectors are missing from the keyword index's text.

The vectors may live on a Chroma server instead (`[rag] chroma_url`, see vectors.py): the journal and the keyword
index stay here and remain the truth. A server that cannot be reached mid-write leaves the documents pending, as a
crash would; `repair_unfinished()` (run by the service once the server answers again) or a retried ingestion
finishes the job, and `check()` also drops collections the server holds that the journal does not know.

Only the supervisor opens these files: an exclusive lock on `rag/lock` refuses a second process (the CLI's
`appliance rag check` while the server runs)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance import db
from appliance.errors import ApplianceError
from appliance.logs import get_logger
from appliance.rag.chunking import Chunk
from appliance.rag.vectors import ChromaServer, VectorStore, reaching
from appliance.storage import StorageFull

log = get_logger(__name__)
KEYWORD_STORE = "the keyword index"

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    owner           TEXT NOT NULL,
    readers         TEXT NOT NULL DEFAULT '[]',
    writers         TEXT NOT NULL DEFAULT '[]',
    embedding_model TEXT NOT NULL,
    version         INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'deleting')),
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    document_id   TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'ready', 'deleting')),
    chunk_count   INTEGER NOT NULL DEFAULT 0,
    bytes         INTEGER NOT NULL DEFAULT 0,
    metadata      TEXT NOT NULL DEFAULT '{}',
    added_by      TEXT NOT NULL,
    vector_key    TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (collection_id, document_id)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id            INTEGER PRIMARY KEY,
    collection_id TEXT NOT NULL,
    document_id   TEXT NOT NULL,
    position      INTEGER NOT NULL,
    UNIQUE (collection_id, document_id, position)
);
"""
# One FTS5 table per collection (fts_<id>): a query reads only its collection's postings, and dropping a
# collection drops its text. A heading word counts half a body word in bm25.
TOKENIZER = "porter unicode61 remove_diacritics 2"
FTS_TABLE = "CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING fts5(heading, body, tokenize = '" + TOKENIZER + "')"
_COLLECTION_ID = re.compile(r"^[0-9a-f]{16}$")
# Query terms found in more than this share of a collection's chunks (and more than COMMON_MIN) add little to
# bm25 (their idf is low) but cost a pass over most of the index: they are left out, rarest terms first, at most
# MAX_TERMS; when every term is common the rarest few still count. Measured (issue 15, bench_rag_long): at 5% the
# long-document keyword MRR is 0.924, at 10% 0.954, with no pruning 0.968; keyword p95 at 100k chunks is 23, 47 and
# 89 ms. 10% keeps hybrid's p95 under 50 ms because the two retrievers run side by side.
COMMON_SHARE, COMMON_MIN, MAX_TERMS = 0.1, 200, 10
# Chroma's HNSW search explores max(ef_search, n_results) candidates (ef_search is 100): asked for only the 50 a query
# needs, it misses true neighbours among many similar chunks (long documents). Asking for this many, and keeping the
# best `limit`, makes the search near exact for a few milliseconds.
VECTOR_CANDIDATES = 200
REPAIR_BATCH = 512  # chunks re-embedded and written per step by check(repair=True)
IDS = "(SELECT value FROM json_each(?))"  # one statement for any number of ids: SQLite caches each distinct text
_WORD = re.compile(r"\w+", re.UNICODE)
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have how i if in into is it its not of on or that the their then "
    "there these they this to was what when where which who why will with you your does do can".split()
)
Vectors = npt.NDArray[np.float32]


class IndexLocked(ApplianceError):
    status_code = 409


@dataclass(frozen=True)
class Hit:
    """A chunk found by one retriever: its key and that retriever's score (higher is better)."""

    chunk_key: int
    score: float


@dataclass(frozen=True)
class StoredChunk:
    key: int
    collection_id: str
    document_id: str
    position: int
    heading: str
    text: str

    @property
    def chunk_id(self) -> str:
        return chunk_id(self.document_id, self.position)


@dataclass(frozen=True)
class NewDocument:
    """A parsed, chunked and embedded document on its way into both stores."""

    id: str
    chunks: Sequence[Chunk]
    vectors: Vectors  # one row per chunk
    metadata: dict[str, Any]
    size: int


@dataclass
class CheckReport:
    collections: int = 0
    documents: int = 0
    chunks: int = 0
    unfinished: list[str] = field(default_factory=list)  # pending or deleting documents / collections
    orphan_vectors: list[str] = field(default_factory=list)  # in Chroma, not in the keyword index
    missing_vectors: list[str] = field(default_factory=list)  # in the keyword index, not in Chroma
    orphan_collections: list[str] = field(default_factory=list)  # Chroma collections the journal does not know
    repaired: bool = False

    @property
    def consistent(self) -> bool:
        return not (self.unfinished or self.orphan_vectors or self.missing_vectors or self.orphan_collections)


def chunk_id(document_id: str, position: int) -> str:
    return f"{document_id}#{position}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def query_words(text: str) -> list[str]:
    """The distinct words of a query, stop words dropped (unless nothing else is left)."""
    words = [w.lower() for w in _WORD.findall(text)]
    kept = [w for w in words if w not in STOPWORDS] or words
    return list(dict.fromkeys(kept))[:64]


def keyword_query(text: str | Sequence[str]) -> str | None:
    """An FTS5 OR-query of the words (quoted, so no FTS syntax gets through)."""
    words = query_words(text) if isinstance(text, str) else list(text)
    return " OR ".join(f'"{w}"' for w in words) if words else None


def fts_table(collection_id: str) -> str:
    if not _COLLECTION_ID.match(collection_id):
        raise ValueError(f"{collection_id!r} is not a collection id")
    return f"fts_{collection_id}"


def _server(index: RagIndex) -> ChromaServer | None:
    return index.vectors.server


class RagIndex:
    def __init__(self, root: Path, server: ChromaServer | None = None) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root
        self._lock_file = (root / "lock").open("a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise IndexLocked(f"the RAG index in {root} is in use by another process (the running server?); "
                              "stop it first, or use the server's API (POST /api/rag/check)",
                              code="index_locked") from None
        self.path = root / "index.db"
        self._write = threading.RLock()
        self._left_pending = False  # a refused write (full disk) left documents pending that it could not remove
        self._totals: dict[str, tuple[int, int]] = {}  # collection -> (version, chunks), for keyword pruning
        self._local = threading.local()
        self._connection().executescript(SCHEMA)
        self.path.chmod(0o600)
        self.vectors = VectorStore(root, server, self._namespace())  # connects on first use
        self.moved_from = self._note_vector_store()

    def _namespace(self) -> str:
        """This data dir's id, made once: its collections' database on a shared Chroma server."""
        with self._conn() as conn:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('namespace', ?)", (uuid.uuid4().hex[:16],))
            return str(conn.execute("SELECT value FROM meta WHERE key = 'namespace'").fetchone()[0])

    def _note_vector_store(self) -> str | None:
        """Where the vectors were kept before, when that was somewhere else and there are documents (embedded Chroma
        before a chroma_url was set, or another server): `check(repair=True)` then re-embeds them all into the new
        store, which is how one moves them."""
        server = self.vectors.server
        here = f"{server.where} ({self.vectors.database})" if server else "embedded"
        with self._conn() as conn:
            before = conn.execute("SELECT value FROM meta WHERE key = 'vectors_at'").fetchone()
            conn.execute("INSERT INTO meta (key, value) VALUES ('vectors_at', ?) ON CONFLICT (key) DO UPDATE SET "
                         "value = excluded.value", (here,))
            documents = conn.execute("SELECT count(*) FROM documents").fetchone()[0]
        return str(before[0]) if before and before[0] != here and documents else None

    @property
    def _max_batch(self) -> int:
        return self.vectors.max_batch

    def close(self) -> None:
        self.vectors.close()
        with contextlib.suppress(Exception):
            self._lock_file.close()

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection: SQLite connections are not shared across threads."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, factory=db.Database)
            conn.store = KEYWORD_STORE
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, inside a transaction."""
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # also when COMMIT itself failed (a full disk): never leave it open
                conn.execute("ROLLBACK")
            raise

    def _chroma(self) -> contextlib.AbstractContextManager[None]:
        """Around every Chroma write: a full disk under embedded Chroma is a `StorageFull` naming the vector index
        (a Chroma server's disk is not ours: see VectorStore.writing)."""
        return self.vectors.writing()

    def _vectors(self, collection_id: str) -> Any:
        return self.vectors.collection(collection_id)

    # collections

    def create_collection(self, name: str, owner: str, readers: Sequence[str], writers: Sequence[str],
                          embedding_model: str) -> dict[str, Any]:
        with self._write, self._conn() as conn:
            cid = uuid.uuid4().hex[:16]
            conn.execute("INSERT INTO collections (id, name, owner, readers, writers, embedding_model, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (cid, name, owner, json.dumps(list(readers)), json.dumps(list(writers)), embedding_model,
                          now_iso()))
            conn.execute(FTS_TABLE.format(table=fts_table(cid)))
        found = self.collection(name)
        assert found is not None
        return found

    def collection(self, name: str) -> dict[str, Any] | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM collections WHERE name = ? AND state = 'ready'", (name,)).fetchone()
        return _collection(row) if row else None

    def collections(self) -> list[dict[str, Any]]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT c.*, (SELECT count(*) FROM documents d WHERE d.collection_id = c.id AND d.state = 'ready') "
                "AS documents FROM collections c WHERE state = 'ready' ORDER BY name").fetchall()
        return [_collection(row) for row in rows]

    @reaching(_server)
    def delete_collection(self, collection_id: str) -> None:
        with self._write:
            with self._conn() as conn:
                conn.execute("UPDATE collections SET state = 'deleting' WHERE id = ?", (collection_id,))
            self._drop_collection(collection_id)

    def _drop_collection(self, collection_id: str) -> None:
        with self._chroma():  # unreachable: the collection stays `deleting` until a repair
            self.vectors.drop(collection_id)
        with self._conn() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {fts_table(collection_id)}")
            conn.execute("DELETE FROM chunks WHERE collection_id = ?", (collection_id,))
            conn.execute("DELETE FROM collections WHERE id = ?", (collection_id,))

    # documents

    def put_document(self, collection_id: str, document_id: str, chunks: Sequence[Chunk], vectors: Vectors,
                     metadata: dict[str, Any], added_by: str, size: int,
                     crash_hook: Callable[[str], None] | None = None) -> None:
        """Add or replace one document in both stores."""
        self.put_documents(collection_id, [NewDocument(document_id, chunks, vectors, metadata, size)], added_by,
                           crash_hook)

    @reaching(_server)
    def put_documents(self, collection_id: str, documents: Sequence[NewDocument], added_by: str,
                      crash_hook: Callable[[str], None] | None = None) -> None:
        """Add or replace documents in both stores, in one pass over each (see the module docstring for the crash
        protocol: all of them are pending until the transaction that makes them ready)."""
        hook = crash_hook or (lambda _: None)
        ids = [d.id for d in documents]
        with self._write:
            self._remove_left_pending()
            stamp = now_iso()
            with self._conn() as conn:
                conn.executemany(
                    "INSERT INTO documents (collection_id, document_id, state, metadata, added_by, bytes, vector_key, "
                    "created_at, updated_at) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?) ON CONFLICT (collection_id, "
                    "document_id) DO UPDATE SET state = 'pending', updated_at = excluded.updated_at",
                    [(collection_id, d.id, json.dumps(d.metadata), added_by, d.size, uuid.uuid4().hex, stamp, stamp)
                     for d in documents])
                keys = self._vector_keys(conn, collection_id, ids)
            try:
                hook("pending")
                self._write_both(collection_id, documents, keys, added_by, stamp, hook)
            except StorageFull:
                self._undo_pending(collection_id, ids)
                raise

    def _write_both(self, collection_id: str, documents: Sequence[NewDocument], keys: dict[str, str], added_by: str,
                    stamp: str, hook: Callable[[str], None]) -> None:
        """Vectors into Chroma, then keyword rows and `ready` in one transaction (the documents are pending).

        A replaced document keeps its vector key, so its chunks' ids recur: they are upserted, and only the ids the
        new version no longer has are deleted. Chroma's HNSW index never reuses the slot of a deleted vector, so
        deleting every chunk and adding it back grew the server's memory with each replacement (the soak: 7 MiB per
        500 replacements of 50 documents, without end)."""
        ids = [d.id for d in documents]
        rows = [(f"{keys[d.id]}#{c.position}", d.vectors[k], {"doc": keys[d.id], "position": c.position})
                for d in documents for k, c in enumerate(d.chunks)]
        with self._chroma():
            vectors_of = self._vectors(collection_id)
            new = {r[0] for r in rows}
            for start in range(0, len(ids), 500):
                held = vectors_of.get(where={"doc": {"$in": [keys[i] for i in ids[start : start + 500]]}},
                                      include=[])["ids"]
                if gone := [i for i in held if i not in new]:
                    vectors_of.delete(ids=gone)
            for start in range(0, len(rows), self._max_batch):
                part = rows[start : start + self._max_batch]
                vectors_of.upsert(ids=[r[0] for r in part], embeddings=np.vstack([r[1] for r in part]),
                                  metadatas=[r[2] for r in part])
                hook("vectors")
        with self._conn() as conn:
            for d in documents:
                self._delete_rows(conn, collection_id, d.id)
                for chunk in d.chunks:
                    key = conn.execute("INSERT INTO chunks (collection_id, document_id, position) VALUES "
                                       "(?, ?, ?)", (collection_id, d.id, chunk.position)).lastrowid
                    conn.execute(f"INSERT INTO {fts_table(collection_id)} (rowid, heading, body) "  # noqa: S608
                                 "VALUES (?, ?, ?)", (key, chunk.heading_path, chunk.text))
                conn.execute("UPDATE documents SET state = 'ready', chunk_count = ?, metadata = ?, added_by = ?, "
                             "bytes = ?, updated_at = ? WHERE collection_id = ? AND document_id = ?",
                             (len(d.chunks), json.dumps(d.metadata), added_by, d.size, stamp, collection_id,
                              d.id))
            conn.execute("UPDATE collections SET version = version + 1 WHERE id = ?", (collection_id,))

    def _undo_pending(self, collection_id: str, document_ids: Sequence[str]) -> None:
        """After a write refused for a full disk: take its pending documents out of both stores, as a restart's
        repair would; where that needs room too, the next write (or check) does it."""
        try:
            for document_id in document_ids:
                self._remove_document(collection_id, document_id)
        except StorageFull:
            self._left_pending = True
            log.warning("rag.undo_deferred", documents=len(document_ids), reason="disk full")

    def _remove_left_pending(self) -> None:
        if self._left_pending:
            self.repair_unfinished()
            self._left_pending = False

    @staticmethod
    def _vector_keys(conn: sqlite3.Connection, collection_id: str, document_ids: Sequence[str]) -> dict[str, str]:
        """Each document's random key in Chroma: Chroma holds vectors, these keys and positions, never an id or
        a word of the documents."""
        rows = conn.execute(f"SELECT document_id, vector_key FROM documents WHERE collection_id = ? AND "  # noqa: S608
                            f"document_id IN {IDS}", (collection_id, json.dumps(list(document_ids))))
        return {r[0]: r[1] for r in rows}

    @reaching(_server)
    def delete_document(self, collection_id: str, document_id: str) -> bool:
        with self._write:
            self._remove_left_pending()
            with self._conn() as conn:
                changed = conn.execute("UPDATE documents SET state = 'deleting' WHERE collection_id = ? AND "
                                       "document_id = ?", (collection_id, document_id)).rowcount
            if not changed:
                return False
            self._remove_document(collection_id, document_id)
            return True

    def _remove_document(self, collection_id: str, document_id: str) -> None:
        """The text leaves the keyword index first, so it is gone from the box even when a Chroma server cannot be
        reached; the journal row (pending or deleting) stays until the vectors are gone too."""
        with self._conn() as conn:
            key = self._vector_keys(conn, collection_id, [document_id]).get(document_id)
            self._delete_rows(conn, collection_id, document_id)
            conn.execute("UPDATE collections SET version = version + 1 WHERE id = ?", (collection_id,))
        if key is not None:
            with self._chroma():
                self._vectors(collection_id).delete(where={"doc": key})
        with self._conn() as conn:
            conn.execute("DELETE FROM documents WHERE collection_id = ? AND document_id = ? AND state != 'ready'",
                         (collection_id, document_id))

    @staticmethod
    def _delete_rows(conn: sqlite3.Connection, collection_id: str, document_id: str) -> None:
        conn.execute(f"DELETE FROM {fts_table(collection_id)} WHERE rowid IN (SELECT id FROM chunks WHERE "  # noqa: S608
                     "collection_id = ? AND "
                     "document_id = ?)", (collection_id, document_id))
        conn.execute("DELETE FROM chunks WHERE collection_id = ? AND document_id = ?", (collection_id, document_id))

    def documents(self, collection_id: str) -> list[dict[str, Any]]:
        with self._conn() as conn:
            rows = conn.execute("SELECT document_id, chunk_count, bytes, metadata, added_by, created_at, updated_at "
                                "FROM documents WHERE collection_id = ? AND state = 'ready' ORDER BY document_id",
                                (collection_id,)).fetchall()
        return [{"id": r["document_id"], "chunks": r["chunk_count"], "bytes": r["bytes"],
                 "metadata": json.loads(r["metadata"]), "created_at": r["created_at"],
                 "updated_at": r["updated_at"]} for r in rows]

    def documents_where(self, condition: str, *params: str) -> list[tuple[str, str]]:
        """(collection id, document id) of the ready documents matching a condition on the documents table (the
        condition is the caller's constant text; values go in `params`)."""
        with self._conn() as conn:
            rows = conn.execute("SELECT collection_id, document_id FROM documents WHERE state = 'ready' AND "  # noqa: S608
                                f"({condition})", params).fetchall()
        return [(r[0], r[1]) for r in rows]

    def document_stats(self) -> tuple[int, str | None]:
        with self._conn() as conn:
            count, oldest = conn.execute("SELECT COUNT(*), MIN(updated_at) FROM documents WHERE state = 'ready'"
                                         ).fetchone()
        return int(count), oldest

    # retrieval

    def keyword_search(self, collection_ids: Sequence[str], query: str, limit: int) -> list[Hit]:
        """BM25 over each collection's FTS5 table (common terms pruned, see COMMON_SHARE), best first."""
        words = query_words(query)
        if not words:
            return []
        hits: list[Hit] = []
        with self._conn() as conn:
            for cid in collection_ids:
                terms = keyword_query(self._selective(conn, cid, words))
                if not terms:
                    continue
                table = fts_table(cid)
                rows = conn.execute(f"SELECT rowid, bm25({table}, 0.5, 1.0) AS rank FROM {table} "  # noqa: S608
                                    f"WHERE {table} MATCH ? ORDER BY rank LIMIT ?", (terms, limit)).fetchall()
                hits += [Hit(int(r[0]), -float(r[1])) for r in rows]
        hits.sort(key=lambda h: -h.score)
        return hits[:limit]

    def _selective(self, conn: sqlite3.Connection, cid: str, words: list[str]) -> list[str]:
        """The query's words that are rare enough in collection `cid` to be worth a pass over their postings."""
        total = self._chunk_total(conn, cid)
        if total <= COMMON_MIN:
            return words[:MAX_TERMS * 2]
        table = fts_table(cid)
        conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.vocab_{cid} USING fts5vocab(main, {table}, row)")
        conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_words USING fts5(w, tokenize = '{TOKENIZER}')")
        conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_terms USING fts5vocab(temp, query_words, instance)")
        conn.execute("DELETE FROM temp.query_words")
        conn.executemany("INSERT INTO temp.query_words (rowid, w) VALUES (?, ?)", list(enumerate(words)))
        stems: dict[str, str] = {}  # the stemmed term the index holds -> a word of the query that makes it
        for term, row in conn.execute("SELECT term, doc FROM temp.query_terms"):
            stems.setdefault(term, words[int(row)])
        counted = []
        for term, word in stems.items():
            found = conn.execute(f"SELECT doc FROM temp.vocab_{cid} WHERE term = ?", (term,)).fetchone()  # noqa: S608
            if found:
                counted.append((int(found[0]), word))
        counted.sort()
        common = max(COMMON_SHARE * total, COMMON_MIN)
        return [w for df, w in counted if df <= common][:MAX_TERMS] or [w for _, w in counted[:3]]

    def _chunk_total(self, conn: sqlite3.Connection, cid: str) -> int:
        version = conn.execute("SELECT version FROM collections WHERE id = ?", (cid,)).fetchone()
        cached = self._totals.get(cid)
        if version is not None and cached is not None and cached[0] == version[0]:
            return cached[1]
        total = int(conn.execute("SELECT count(*) FROM chunks WHERE collection_id = ?", (cid,)).fetchone()[0])
        self._totals[cid] = (version[0] if version else -1, total)
        return total

    @reaching(_server)
    def vector_search(self, collection_ids: Sequence[str], vector: Vectors, limit: int) -> list[Hit]:
        found: list[tuple[str, str, int, float]] = []
        for cid in collection_ids:
            vectors_of = self._vectors(cid)
            result = vectors_of.query(query_embeddings=vector.reshape(1, -1), n_results=max(limit, VECTOR_CANDIDATES),
                                      include=["distances", "metadatas"])
            pairs = zip(result["metadatas"][0], result["distances"][0], strict=True)
            # a vector replaced or deleted while the query ran comes back without its metadata: gone, so no hit
            found.extend((cid, str(meta["doc"]), int(meta["position"]), 1.0 - float(distance))
                         for meta, distance in [(m, d) for m, d in pairs if m is not None][:limit])
        found.sort(key=lambda f: -f[3])
        found = found[:limit]
        keys = self._keys([(c, d, p) for c, d, p, _ in found])
        return [Hit(keys[(c, d, p)], score) for c, d, p, score in found if (c, d, p) in keys]

    def _keys(self, triples: Sequence[tuple[str, str, int]]) -> dict[tuple[str, str, int], int]:
        """Chunk keys of (collection, vector key, position) triples that belong to ready documents."""
        if not triples:
            return {}
        with self._conn() as conn:
            rows = conn.execute(
                "WITH wanted (cid, vkey, pos) AS (SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?)) "
                "SELECT c.id, w.cid, w.vkey, w.pos FROM wanted w "
                "JOIN documents d ON d.collection_id = w.cid AND d.vector_key = w.vkey AND d.state = 'ready' "
                "JOIN chunks c ON c.collection_id = d.collection_id AND c.document_id = d.document_id "
                "AND c.position = w.pos", (json.dumps(list(triples)),)).fetchall()
        return {(r[1], r[2], int(r[3])): int(r[0]) for r in rows}

    def chunks(self, keys: Sequence[int]) -> dict[int, StoredChunk]:
        if not keys:
            return {}
        out: dict[int, StoredChunk] = {}
        with self._conn() as conn:
            rows = conn.execute(f"SELECT id, collection_id, document_id, position FROM chunks WHERE id IN {IDS}",  # noqa: S608
                                (json.dumps(list(keys)),)).fetchall()
            by_collection: dict[str, list[sqlite3.Row]] = {}
            for row in rows:
                by_collection.setdefault(row[1], []).append(row)
            for cid, members in by_collection.items():
                ids = [int(r[0]) for r in members]
                table = fts_table(cid)
                text = {int(r[0]): (r[1], r[2]) for r in conn.execute(
                    f"SELECT rowid, heading, body FROM {table} WHERE rowid IN {IDS}", (json.dumps(ids),))}  # noqa: S608
                for r in members:
                    if int(r[0]) in text:
                        heading, body = text[int(r[0])]
                        out[int(r[0])] = StoredChunk(int(r[0]), cid, r[2], int(r[3]), heading, body)
        return out

    # consistency

    def unfinished(self) -> int:
        """How many documents and collections wait for a repair (pending, deleting)."""
        with self._conn() as conn:
            return int(conn.execute("SELECT (SELECT count(*) FROM documents WHERE state != 'ready') + "
                                    "(SELECT count(*) FROM collections WHERE state = 'deleting')").fetchone()[0])

    @reaching(_server)
    def repair_unfinished(self) -> list[str]:
        """Finish what a crash interrupted: pending and deleting documents leave both stores, deleting collections
        go. Returns what was removed."""
        removed = []
        with self._write:
            with self._conn() as conn:
                docs = conn.execute("SELECT collection_id, document_id FROM documents WHERE state != 'ready'"
                                    ).fetchall()
                gone = conn.execute("SELECT id, name FROM collections WHERE state = 'deleting'").fetchall()
            for row in docs:
                self._remove_document(row[0], row[1])
                removed.append(f"document {row[1]!r}")
            for row in gone:
                self._drop_collection(row[0])
                removed.append(f"collection {row[1]!r}")
        return removed

    @reaching(_server)
    def check(self, repair: bool, embed: Callable[[list[str]], Vectors] | None = None) -> CheckReport:
        report = CheckReport()
        with self._write:
            self._remove_left_pending()  # what a refused write left is this process's own to finish, not damage
            with self._conn() as conn:
                unfinished = conn.execute("SELECT document_id FROM documents WHERE state != 'ready' UNION ALL "
                                          "SELECT name FROM collections WHERE state = 'deleting'").fetchall()
            report.unfinished = [r[0] for r in unfinished]
            if repair and report.unfinished:
                self.repair_unfinished()
            known = set()
            for collection in self.collections():
                known.add(collection["id"])
                report.collections += 1
                report.documents += collection["documents"]
                self._check_collection(collection["id"], report, repair, embed)
            with self._conn() as conn:
                known |= {r[0] for r in conn.execute("SELECT id FROM collections").fetchall()}
            report.orphan_collections = sorted(set(self.vectors.collection_ids()) - known)
            if repair:
                with self._chroma():
                    for cid in report.orphan_collections:
                        self.vectors.drop(cid)
        report.repaired = repair
        return report

    def _check_collection(self, cid: str, report: CheckReport, repair: bool,
                          embed: Callable[[list[str]], Vectors] | None) -> None:
        with self._conn() as conn:
            rows = conn.execute("SELECT d.vector_key, c.document_id, c.position, t.heading, t.body FROM chunks c "  # noqa: S608
                                f"JOIN {fts_table(cid)} t ON t.rowid = c.id JOIN documents d ON d.collection_id = "
                                "c.collection_id AND d.document_id = c.document_id WHERE c.collection_id = ?",
                                (cid,)).fetchall()
        indexed = {f"{r[0]}#{int(r[2])}": r for r in rows}
        report.chunks += len(indexed)
        vectors_of = self.vectors.collection(cid, fresh=True)  # the server may have lost it since
        stored: set[str] = set()
        offset = 0
        while True:
            page = vectors_of.get(include=[], limit=self._max_batch, offset=offset)["ids"]
            stored.update(page)
            if len(page) < self._max_batch:
                break
            offset += len(page)
        orphans = sorted(stored - indexed.keys())
        missing = sorted(indexed.keys() - stored)
        report.orphan_vectors += orphans
        report.missing_vectors += missing
        if not repair:
            return
        step = min(self._max_batch, REPAIR_BATCH)  # a whole collection may be missing (vectors moved to a server)
        with self._chroma():
            for start in range(0, len(orphans), step):
                vectors_of.delete(ids=orphans[start : start + step])
            for start in range(0, len(missing), step):
                if embed is None:
                    break
                part = missing[start : start + step]
                texts = [f"{indexed[m][3]}\n{indexed[m][4]}" if indexed[m][3] else indexed[m][4] for m in part]
                vectors_of.add(ids=part, embeddings=embed(texts),
                               metadatas=[{"doc": indexed[m][0], "position": int(indexed[m][2])} for m in part])

    def compact(self) -> None:
        """Rewrite the keyword index and the database so deleted text leaves no trace in free pages or old
        segments (privacy erasure)."""
        with self._write:
            with self._conn() as conn:
                for (cid,) in conn.execute("SELECT id FROM collections").fetchall():
                    table = fts_table(cid)
                    conn.execute(f"INSERT INTO {table} ({table}) VALUES ('optimize')")  # noqa: S608
            conn = self._connection()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _collection(row: sqlite3.Row) -> dict[str, Any]:
    out = {"id": row["id"], "name": row["name"], "owner": row["owner"], "readers": json.loads(row["readers"]),
           "writers": json.loads(row["writers"]), "version": row["version"],
           "embedding_model": row["embedding_model"], "created_at": row["created_at"]}
    if "documents" in row.keys():
        out["documents"] = row["documents"]
    return out

