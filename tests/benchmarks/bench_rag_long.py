"""RAG quality on long documents nobody on the project wrote: modules rendered by `pydoc` as whole plain-text pages
(about 2,000 words each, some over 30,000), one known-item query per page (the first line of the module's
docstring), beside the docstring set of bench_rag (documents one or two chunks long). The long set is every
standard-library page, then pages of the third-party packages installed beside the appliance (site-packages, at
most three modules a package) up to --pages (500); `long-stripped` is the same pages with the summary line cut out,
so that no query is found verbatim in its page.

Reports MRR, recall@1 and recall@10 per document for the appliance's vector, keyword and hybrid retrieval
(in-process through RagService, and with --via-api through a real `appliance serve` and its HTTP API, as a user
gets it) and, in the same run, a plain baseline:
* vector: all-MiniLM-L6-v2 over the first four 128-word chunks of each page, a page scored by its best chunk;
* BM25: Okapi (k1 1.5, b 0.75) over whole pages, lower-cased words, English stop words removed;
* hybrid: reciprocal rank fusion (k 60) of the two page rankings.

The pages are rendered once in a child process (importing hundreds of modules has side effects) and kept in
.bench/pydoc-pages-<python>[-thirdparty].json; embeddings are cached in .bench/embeddings so that a second run only
embeds what changed (with --via-api the server's cache starts as a copy of it, unless --cold-server).

    .venv/bin/python -m tests.benchmarks.bench_rag_long --via-api  # long, long-stripped, docstrings
    .venv/bin/python -m tests.benchmarks.bench_rag_long --set long --shares 0.05,0.1,0.2,1.0  # pruning threshold
    .venv/bin/python -m tests.benchmarks.bench_rag_long --set long,docstrings --suspects  # issue 15's suspects

Query latency at 100k chunks is bench_rag's (`--sizes 100000`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib
import io
import json
import math
import pkgutil
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from appliance.auth.rbac import Rbac
from appliance.config import RagSettings
from appliance.observability.metrics import Metrics
from appliance.rag.embeddings import EmbeddingService
from appliance.rag.jobs import Incoming
from appliance.rag.service import RagService
from appliance.resources import shipped
from tests.benchmarks.bench_rag import ME, MODES, corpus, percentile, rank_of

BENCH = Path(__file__).resolve().parents[2] / ".bench"
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
        "pydoc_data", "__main__", "__phello__"}
RRF_K = 60
Pair = tuple[str, str, str]  # (document id, query, document text)
Ranks = list[int | None]


def _render(name: str) -> Pair | None:
    """(name, docstring's first line, pydoc's plain-text page) of a module, or None if it does not import."""
    import pydoc

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module = importlib.import_module(name)
            page = pydoc.render_doc(module, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
    except BaseException:
        return None
    return name, (module.__doc__ or "").strip().split("\n")[0].strip(), page


def render_pages(out: Path) -> None:
    """Every public standard-library module and submodule that imports, as (name, docstring's first line, page)."""
    warnings.simplefilter("ignore")
    tops = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)
    names = []
    for top in tops:
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(top)
        except BaseException:
            continue
        names.append(top)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), top + ".", onerror=lambda _: None):
            if not any(p.startswith("_") or p in ("test", "tests") for p in info.name.split(".")):
                names.append(info.name)
    pages = [page for page in map(_render, names) if page is not None]
    out.write_text(json.dumps(pages))


THIRD_PARTY_SKIP = {"appliance", "tests", "_distutils_hack", "include", "lib", "schemas", "isympy", "functorch",
                    "torchgen", "mypyc", "setuptools", "pip", "google", "py", "_pytest", "_yaml"}
THIRD_PARTY_PER_PACKAGE = 3
LARGEST_PAGE_WORDS = 60_000  # a few giant pages (numpy's, torch's) would cost more embedding than all the rest


def render_third_party(out: Path, seed: int) -> None:
    """Modules of the third-party packages installed beside the appliance (site-packages), at most
    THIRD_PARTY_PER_PACKAGE public ones per package, picked at random, as (name, docstring's first line, page)."""
    import sysconfig

    warnings.simplefilter("ignore")
    root = Path(sysconfig.get_paths()["purelib"])
    rng = random.Random(seed)
    pages = []
    for top in sorted(m.name for m in pkgutil.iter_modules([str(root)])):
        if top.startswith("_") or top in THIRD_PARTY_SKIP:
            continue
        folder = root / top
        files = sorted(folder.rglob("*.py")) if folder.is_dir() else []
        names = [top]
        for path in files:
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            if len(parts) > 1 and not any(p.startswith("_") or p in ("test", "tests", "testing", "vendor",
                                                                       "vendored", "conftest") for p in parts):
                names.append(".".join(parts))
        rng.shuffle(names)
        taken = 0
        for name in names:
            rendered = _render(name)
            if rendered and len(rendered[1].split()) >= 4 and len(rendered[2].split()) <= LARGEST_PAGE_WORDS:
                pages.append(rendered)
                taken += 1
                if taken == THIRD_PARTY_PER_PACKAGE:
                    break
    out.write_text(json.dumps(pages))


def _rendered(kind: str, seed: int) -> list[tuple[str, str, str]]:
    """Pages rendered once in a child process (importing hundreds of modules has side effects), kept in .bench."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    cached = BENCH / (f"pydoc-pages-{version}.json" if kind == "stdlib" else f"pydoc-pages-{version}-{kind}.json")
    if not cached.exists():
        BENCH.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_rag_long", f"--render-{kind}", str(cached),
                        "--seed", str(seed)], check=True, cwd=BENCH.parent, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=1800)
    return [(str(n), str(f), str(p)) for n, f, p in json.loads(cached.read_text())]


def long_corpus(n: int, seed: int, third_party: bool = True, largest: int = LARGEST_PAGE_WORDS) -> list[Pair]:
    """Every standard-library page, then third-party pages picked at random up to n pages in all; only pages with a
    summary of at least four words that no other page shares (a query two pages answer cannot be scored), and whose
    text no other page repeats (vendored or re-exported copies)."""
    stdlib = _rendered("stdlib", seed)
    others = _rendered("thirdparty", seed) if third_party else []
    pages = [p for p in stdlib + others if len(p[1].split()) >= 4 and len(p[2].split()) <= largest]
    summaries = collections.Counter(_normal(first) for _, first, _ in pages)
    bodies = collections.Counter(_normal(page.partition("\n")[2]) for _, _, page in pages)
    unique = {p[0] for p in pages if summaries[_normal(p[1])] == 1 and bodies[_normal(p[2].partition("\n")[2])] == 1}
    rng = random.Random(seed)
    mine = sorted(p for p in stdlib if p[0] in unique)
    theirs = sorted(p for p in others if p[0] in unique)
    rng.shuffle(mine)
    rng.shuffle(theirs)
    chosen = (mine + theirs)[:n]
    rng.shuffle(chosen)
    return chosen


def _normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def without_summary(pairs: Sequence[Pair]) -> list[Pair]:
    """The pages with every occurrence of their one-line summary cut out (pydoc repeats it under NAME and
    DESCRIPTION), so that a query is never found verbatim in the page it asks for."""
    out = []
    for doc_id, query, page in pairs:
        words = re.findall(r"\S+", query)
        pattern = re.compile(r"\s+".join(re.escape(w) for w in words))
        out.append((doc_id, query, pattern.sub(" ", page)))
    return out


# the plain baseline

def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS  # type: ignore[import-untyped]

    return frozenset(ENGLISH_STOP_WORDS)


def bm25_pages(pairs: Sequence[Pair], k1: float = 1.5, b: float = 0.75) -> Callable[[str], list[int]]:
    """Okapi BM25 over whole pages; returns a function from a query to page indexes, best first."""
    stop = _stop_words()
    docs = [[w for w in re.findall(r"\w+", text.lower()) if w not in stop] for _, _, text in pairs]
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    avg = lengths.mean()
    tf = [collections.Counter(d) for d in docs]
    df = collections.Counter(w for c in tf for w in c)
    n = len(docs)

    def rank(query: str) -> list[int]:
        scores = np.zeros(n)
        for w in set(re.findall(r"\w+", query.lower())) - stop:
            if w not in df:
                continue
            idf = math.log((n - df[w] + 0.5) / (df[w] + 0.5) + 1)
            for i, c in enumerate(tf):
                f = c.get(w, 0)
                if f:
                    scores[i] += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * lengths[i] / avg))
        return [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > 0]

    return rank


def baseline_ranks(embeddings: EmbeddingService, pairs: Sequence[Pair]) -> dict[str, Ranks]:
    texts, owner = [], []
    for i, (_, _, text) in enumerate(pairs):
        words = text.split()
        for start in range(0, min(len(words), 4 * 128), 128):
            texts.append(" ".join(words[start : start + 128]))
            owner.append(i)
    chunk_vectors = embeddings.embed_sync(texts).vectors
    query_vectors = embeddings.embed_sync([q for _, q, _ in pairs]).vectors
    owners = np.array(owner)
    bm25 = bm25_pages(pairs)
    out: dict[str, Ranks] = {"vector": [], "keyword": [], "hybrid": []}
    for qi, (_, query, _) in enumerate(pairs):
        sims = chunk_vectors @ query_vectors[qi]
        best = np.full(len(pairs), -np.inf)
        np.maximum.at(best, owners, sims)
        vector = [int(i) for i in np.argsort(-best, kind="stable")]
        keyword = bm25(query)
        fused: dict[int, float] = collections.defaultdict(float)
        for ranking in (vector, keyword):
            for r, i in enumerate(ranking, start=1):
                fused[i] += 1 / (RRF_K + r)
        hybrid = sorted(fused, key=lambda i: -fused[i])
        for mode, ranking in (("vector", vector), ("keyword", keyword), ("hybrid", hybrid)):
            out[mode].append(ranking.index(qi) + 1 if qi in ranking[:10] else None)
    return out


def scores(ranks: Ranks) -> dict[str, float]:
    return {"mrr": sum(1 / r for r in ranks if r) / len(ranks), "recall@1": sum(r == 1 for r in ranks) / len(ranks),
            "recall@10": sum(r is not None and r <= 10 for r in ranks) / len(ranks)}


# the appliance

async def appliance_ranks(rag: RagService, collection: str, pairs: Sequence[Pair]) -> dict[str, Ranks]:
    out: dict[str, Ranks] = {}
    for mode in MODES:
        out[mode] = [rank_of(await rag.query(ME, [collection], query, top_k=10, mode=mode, per_document=1),  # type: ignore[arg-type]
                             doc_id) for doc_id, query, _ in pairs]
    return out


async def ingest(rag: RagService, pairs: Sequence[Pair], collection: str) -> tuple[float, int]:
    await rag.create_collection(ME, collection)
    started = time.perf_counter()
    chunks = 0
    for start in range(0, len(pairs), 100):
        result = await rag.add_documents(ME, collection, [Incoming(d, t.encode(), "text", {})
                                                          for d, _, t in pairs[start : start + 100]])
        chunks += int(result.get("chunks", 0))
    return time.perf_counter() - started, chunks


def open_service(tmp: Path, settings: RagSettings) -> tuple[RagService, EmbeddingService]:
    metrics = Metrics()
    embeddings = EmbeddingService(settings, BENCH / "embeddings", metrics)
    rag = RagService(settings, tmp / "rag", embeddings, Rbac.load(shipped("policies/rbac.toml")), metrics)
    return rag, embeddings


# research: the suspects of issue 15, measured on the same index

def group(hits: Sequence[Any], doc_of: dict[int, str]) -> list[str]:
    """Documents in the order of their first chunk in a ranking."""
    return list(dict.fromkeys(doc_of[h.chunk_key] for h in hits if h.chunk_key in doc_of))


def keys_group(keys: Sequence[int], doc_of: dict[int, str]) -> list[str]:
    return list(dict.fromkeys(doc_of[k] for k in keys if k in doc_of))


def rrf(rankings: Sequence[Sequence[Any]], weights: Sequence[float] | None = None, k: int = RRF_K) -> list[Any]:
    fused: dict[Any, float] = collections.defaultdict(float)
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings), strict=True):
        for r, item in enumerate(ranking, start=1):
            fused[item] += weight / (k + r)
    return sorted(fused, key=lambda key: -fused[key])


def score_fusion(rankings: Sequence[Sequence[Any]], z: bool = False) -> list[int]:
    """Chunk keys by the sum of each retriever's scores normalised per query (min-max, or z-scores)."""
    fused: dict[int, float] = collections.defaultdict(float)
    for hits in rankings:
        if not hits:
            continue
        values = np.array([h.score for h in hits])
        if z:
            norm = (values - values.mean()) / (values.std() or 1.0)
            floor = float(norm.min())
        else:
            span = float(values.max() - values.min()) or 1.0
            norm = (values - values.min()) / span
            floor = 0.0
        for h, v in zip(hits, norm, strict=True):
            fused[h.chunk_key] += float(v) - floor
    return sorted(fused, key=lambda key: -fused[key])


def rank_in(docs: Sequence[str], wanted: str) -> int | None:
    return docs.index(wanted) + 1 if wanted in docs[:10] else None


def document_bm25(pairs: Sequence[Pair]) -> Callable[[str, int], list[str]]:
    """BM25 of FTS5 (the index's own tokenizer) over whole documents, one row per document."""
    import sqlite3

    from appliance.rag.index import TOKENIZER, keyword_query

    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE VIRTUAL TABLE d USING fts5(body, tokenize = '{TOKENIZER}')")
    conn.executemany("INSERT INTO d (rowid, body) VALUES (?, ?)", [(i, t) for i, (_, _, t) in enumerate(pairs)])
    ids = [d for d, _, _ in pairs]

    def search(query: str, limit: int) -> list[str]:
        terms = keyword_query(query)
        if not terms:
            return []
        rows = conn.execute("SELECT rowid FROM d WHERE d MATCH ? ORDER BY bm25(d) LIMIT ?", (terms, limit))
        return [ids[int(r[0])] for r in rows]

    return search


async def thresholds(rag: RagService, collection: str, pairs: Sequence[Pair],
                     shares: Sequence[float]) -> dict[str, Ranks]:
    """Keyword and hybrid (as served by this code) with the common-term threshold at each share."""
    from appliance.rag import index as index_module
    from appliance.rag.service import fuse

    cid = rag.index.collection(collection)["id"]  # type: ignore[index]
    doc_of = {int(k): d for k, d in rag.index._connection().execute(
        "SELECT id, document_id FROM chunks WHERE collection_id = ?", (cid,))}
    out: dict[str, Ranks] = collections.defaultdict(list)
    saved = index_module.COMMON_SHARE
    try:
        for doc_id, query, _ in pairs:
            vector = rag.index.vector_search([cid], (await rag.embeddings.embed([query])).vectors[0], 50)
            for share in shares:
                index_module.COMMON_SHARE = share
                keyword = rag.index.keyword_search([cid], query, 50)
                out[f"keyword, common share {share}"].append(rank_in(group(keyword, doc_of), doc_id))
                out[f"hybrid, common share {share}"].append(rank_in(group(fuse([keyword, vector]), doc_of), doc_id))
    finally:
        index_module.COMMON_SHARE = saved
    return dict(out)


async def suspects(rag: RagService, collection: str, pairs: Sequence[Pair]) -> dict[str, Ranks]:
    from appliance.rag import index as index_module

    cid = rag.index.collection(collection)["id"]  # type: ignore[index]
    conn = rag.index._connection()
    doc_of = {int(k): d for k, d in conn.execute("SELECT id, document_id FROM chunks WHERE collection_id = ?",
                                                 (cid,))}
    counts = collections.Counter(doc_of.values())
    headed = conn.execute(f"SELECT count(*) FROM fts_{cid} WHERE heading != ''").fetchone()[0]
    print(f"chunks: {len(doc_of)}, per document median {sorted(counts.values())[len(counts) // 2]}, "
          f"max {max(counts.values())}; chunks with a heading path: {headed}")
    whole = document_bm25(pairs)
    depth, deep = 50, 1000
    out: dict[str, Ranks] = collections.defaultdict(list)
    distinct = []
    for doc_id, query, _ in pairs:
        vector = rag.index.vector_search([cid], (await rag.embeddings.embed([query])).vectors[0], deep)
        pruned = rag.index.keyword_search([cid], query, deep)
        saved = index_module.COMMON_SHARE, index_module.MAX_TERMS
        index_module.COMMON_SHARE, index_module.MAX_TERMS = 1.0, 64
        try:
            exact = rag.index.keyword_search([cid], query, deep)
        finally:
            index_module.COMMON_SHARE, index_module.MAX_TERMS = saved
        distinct.append(len(group(pruned[:depth], doc_of)))
        docs_bm25 = whole(query, 100)
        shallow = rag.index.vector_search([cid], (await rag.embeddings.embed([query])).vectors[0], depth)
        mid = rag.index.vector_search([cid], (await rag.embeddings.embed([query])).vectors[0], 200)
        m50 = group(mid[:depth], doc_of)
        mk = [h.chunk_key for h in mid[:depth]]
        vk, pk, xk, sk = ([h.chunk_key for h in hits] for hits in (vector, pruned, exact, shallow))
        v50, k50, x50, s50 = (group(hits[:depth], doc_of) for hits in (vector, pruned, exact, shallow))
        vd, xd = group(vector, doc_of), group(exact, doc_of)
        variants = {
            "vector (as served: 50 kept of 200 hnsw candidates)": s50,
            "vector, 1000 asked (near exact), top 50": v50,
            "keyword (as served: pruned, chunk bm25)": k50,
            "keyword, no pruning": x50,
            "keyword, document bm25 (fts5, whole doc)": docs_bm25,
            "hybrid, chunk rrf of 50 + 50 (fusion before 722c518)": keys_group(rrf([pk[:depth], sk]), doc_of),
            "hybrid, chunk rrf, vector 1000 asked": keys_group(rrf([pk[:depth], vk[:depth]]), doc_of),
            "hybrid, chunk rrf, no pruning": keys_group(rrf([xk[:depth], sk]), doc_of),
            "hybrid, chunk rrf, no pruning, vector 1000 asked": keys_group(rrf([xk[:depth], vk[:depth]]), doc_of),
            "hybrid, chunk rrf, no pruning, depth 1000": keys_group(rrf([xk, vk]), doc_of),
            "hybrid, document rrf (best chunk)": rrf([k50, s50]),
            "hybrid, document rrf, vector 1000 asked": rrf([k50, v50]),
            "hybrid, document rrf, no pruning": rrf([x50, s50]),
            "hybrid, document rrf, no pruning, vector 1000 asked": rrf([x50, v50]),
            "hybrid, document rrf, no pruning, depth 1000": rrf([xd, vd]),
            "hybrid, document rrf: document bm25 + vector": rrf([docs_bm25, s50]),
            "hybrid, document rrf: doc bm25 + exact chunk bm25 + vector": rrf([docs_bm25, x50, s50]),
            "hybrid, document rrf, no pruning, vector 2 : keyword 1": rrf([x50, s50], [1.0, 2.0]),
            "vector, 200 asked, top 50": m50,
            "hybrid, chunk rrf, no pruning, vector 200 asked": keys_group(rrf([xk[:depth], mk]), doc_of),
            "hybrid, chunk rrf k=20, no pruning, vector 200 asked": keys_group(rrf([xk[:depth], mk], k=20), doc_of),
            "hybrid, chunk score fusion (min-max), no pruning, v200": keys_group(
                score_fusion([exact[:depth], mid[:depth]]), doc_of),
            "hybrid, chunk score fusion (z-score), no pruning, v200": keys_group(
                score_fusion([exact[:depth], mid[:depth]], z=True), doc_of),
        }
        for name, ranking in variants.items():
            out[name].append(rank_in(ranking, doc_id))
    print(f"distinct documents in the keyword index's top {depth} chunks: median "
          f"{sorted(distinct)[len(distinct) // 2]}, min {min(distinct)}")
    return dict(out)


def table(title: str, rows: dict[str, dict[str, Ranks]]) -> None:
    print(f"\n{title}")
    print(f"{'':<11} {'mode':<8} {'MRR':>6} {'R@1':>6} {'R@10':>6}")
    for who, ranks in rows.items():
        for mode, r in ranks.items():
            s = scores(r)
            print(f"{who:<11} {mode:<8} {s['mrr']:>6.3f} {s['recall@1']:>6.3f} {s['recall@10']:>6.3f}")


SETS = {
    "long": "pydoc pages of the standard library and of the third-party packages installed beside it",
    "long-stripped": "the long set with each page's one-line summary (the query) cut out of the page",
    "stdlib-pages": "the long set's standard-library pages only",
    "docstrings": "bench_rag's docstring set (documents one or two chunks long)",
}


def evaluation_sets(names: Sequence[str], args: argparse.Namespace) -> dict[str, list[Pair]]:
    sets = {}
    for name in names:
        if name not in SETS:
            raise SystemExit(f"unknown set {name!r}; the sets are {', '.join(SETS)}")
        if name == "docstrings":
            sets[name] = corpus(args.docs, args.seed)
        elif name == "stdlib-pages":
            sets[name] = long_corpus(args.pages, args.seed, third_party=False, largest=args.largest_page)
        else:
            pages = long_corpus(args.pages, args.seed, largest=args.largest_page)
            sets[name] = without_summary(pages) if name == "long-stripped" else pages
    return sets


# through the real server, as a user gets it

@contextlib.contextmanager
def served(warm_cache: Path | None) -> Iterator[httpx.Client]:
    """The real `appliance serve` (tests/server.py's ServerProcess) on a free port with a fresh data dir made by
    `appliance init`, its default settings, no chat model, an admin key from `appliance keys create`. With
    `warm_cache`, the server's embedding cache starts as a copy of that one (the vectors are the same; only the
    ingestion time changes)."""
    from tests.server import ServerProcess, appliance, new_key

    with tempfile.TemporaryDirectory(prefix="bench-rag-long-") as tmp:
        data = Path(tmp) / "data"
        appliance("init", data_dir=data)
        if warm_cache is not None and warm_cache.exists():
            shutil.copytree(warm_cache, data / "cache" / "embeddings", dirs_exist_ok=True)
        key = new_key(data)
        process = ServerProcess(data)
        try:
            process.start(wait_ready=False)  # /healthz: the API is up (no chat model is needed for RAG)
            with httpx.Client(base_url=process.url, headers={"Authorization": f"Bearer {key}"},
                              timeout=1800) as client:
                yield client
        finally:
            process.stop()


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                           f"{response.text[:500]}")
    return dict(response.json())


def api_ingest(client: httpx.Client, pairs: Sequence[Pair], collection: str) -> tuple[float, int]:
    """POST /api/collections, then the documents in batches ({"documents": [...]}, at most 100 and 4 MB each);
    a batch the server turns into a job (202) is followed on GET /api/jobs/{id} until it is done."""
    _ok(client.post("/api/collections", json={"name": collection}))
    batches: list[list[dict[str, str]]] = [[]]
    size = 0
    for doc_id, _, text in pairs:
        if batches[-1] and (len(batches[-1]) == 100 or size + len(text) > 4_000_000):
            batches.append([])
            size = 0
        batches[-1].append({"id": doc_id, "text": text})
        size += len(text)
    started = time.perf_counter()
    chunks = 0
    for batch in batches:
        reply = _ok(client.post(f"/api/collections/{collection}/documents", json={"documents": batch}))
        while reply["object"] == "ingestion.job" and reply["state"] not in ("done", "failed"):
            time.sleep(0.05)  # polling a job, as a client does; not a timing
            reply = _ok(client.get(f"/api/jobs/{reply['id']}"))
        if reply.get("state") == "failed":
            raise RuntimeError(f"ingestion job failed: {reply['error']}")
        chunks += int(reply["total"] if reply["object"] == "ingestion.job" else reply["chunks"])
    return time.perf_counter() - started, chunks


def api_ranks(client: httpx.Client, collection: str, pairs: Sequence[Pair]
              ) -> tuple[dict[str, Ranks], dict[str, list[float]]]:
    """Each query through POST /api/collections/{name}/query (top 10, one chunk per document), per mode; with
    each request's time as the client sees it (HTTP, auth and JSON included)."""
    ranks: dict[str, Ranks] = {}
    times: dict[str, list[float]] = {}
    for mode in MODES:
        ranks[mode], times[mode] = [], []
        for doc_id, query, _ in pairs:
            started = time.perf_counter()
            found = _ok(client.post(f"/api/collections/{collection}/query",
                                    json={"query": query, "top_k": 10, "mode": mode, "per_document": 1}))["data"]
            times[mode].append((time.perf_counter() - started) * 1000)
            documents = [r["document_id"] for r in found]
            ranks[mode].append(documents.index(doc_id) + 1 if doc_id in documents else None)
    return ranks, times


async def main(args: argparse.Namespace) -> None:
    settings = RagSettings(job_threshold_bytes=1 << 40, chunk_tokens=args.chunk_tokens,
                           chunk_overlap=args.chunk_overlap)
    sets = evaluation_sets(args.set, args)
    results: dict[str, dict[str, dict[str, Ranks]]] = {}
    for name, pairs in sets.items():
        words = [len(t.split()) for _, _, t in pairs]
        print(f"\n== {name} ({SETS[name]}): {len(pairs)} documents, {sum(words) / len(words):.0f} words on "
              f"average, largest {max(words)}, Python {sys.version.split()[0]}")
        if args.api_only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rag, embeddings = open_service(Path(tmp), settings)
            took, chunks = await ingest(rag, pairs, name)
            print(f"in-process: ingested {chunks} chunks in {took:.0f} s")
            base = baseline_ranks(embeddings, pairs)
            results[name] = {"baseline": base, "in-process": await appliance_ranks(rag, name, pairs)}
            table(f"{name}: per document, top 10", results[name])
            if args.shares:
                for variant, r in (await thresholds(rag, name, pairs, args.shares)).items():
                    s = scores(r)
                    print(f"  {variant:<58} {s['mrr']:>6.3f} {s['recall@1']:>6.3f} {s['recall@10']:>6.3f}")
            if args.suspects:
                found = await suspects(rag, name, pairs)
                print(f"\n{name}: suspects, offline over the same index (top 10)")
                for variant, r in found.items():
                    s = scores(r)
                    print(f"  {variant:<58} {s['mrr']:>6.3f} {s['recall@1']:>6.3f} {s['recall@10']:>6.3f}")
            rag.close()
            embeddings.close()
    if args.via_api or args.api_only:
        started = time.perf_counter()
        with served(None if args.cold_server else BENCH / "embeddings") as client:
            print(f"\nappliance serve up in {time.perf_counter() - started:.0f} s "
                  f"({'cold' if args.cold_server else 'warm'} embedding cache)")
            for name, pairs in sets.items():
                if name not in results:  # --api-only: the baseline of this run, then the server
                    embeddings = EmbeddingService(settings, BENCH / "embeddings", Metrics())
                    results[name] = {"baseline": baseline_ranks(embeddings, pairs)}
                    embeddings.close()
                took, chunks = api_ingest(client, pairs, name)
                print(f"\n{name} via the API: ingested {chunks} chunks in {took:.0f} s")
                ranks, times = api_ranks(client, name, pairs)
                results[name]["api"] = ranks
                for mode in MODES:
                    print(f"  query {mode:<8} p50 {percentile(times[mode], 50):6.1f} ms, "
                          f"p95 {percentile(times[mode], 95):6.1f} ms ({chunks} chunks, HTTP included)")
                table(f"{name}: per document, top 10", results[name])
        print(f"\nthrough the API in {time.perf_counter() - started:.0f} s in all")
    print("\n== summary: MRR / R@1 / R@10 per document, top 10")
    for name, rows in results.items():
        table(f"{name} ({len(sets[name])} documents)", rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", type=lambda s: s.split(","), default=["long", "long-stripped", "docstrings"],
                        help="evaluation sets, comma-separated: " + "; ".join(f"{k}: {v}" for k, v in SETS.items()))
    parser.add_argument("--pages", type=int, default=500, help="most pydoc pages in the long set")
    parser.add_argument("--largest-page", type=int, default=LARGEST_PAGE_WORDS,
                        help="leave out pages of more words than this (embedding time grows with the words)")
    parser.add_argument("--docs", type=int, default=2000, help="documents in the docstring set")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--chunk-tokens", type=int, default=RagSettings().chunk_tokens, help="rag.chunk_tokens")
    parser.add_argument("--chunk-overlap", type=int, default=RagSettings().chunk_overlap, help="rag.chunk_overlap")
    parser.add_argument("--shares", type=lambda s: [float(x) for x in s.split(",")], default=[],
                        help="also measure keyword and hybrid with these common-term thresholds")
    parser.add_argument("--suspects", action="store_true", help="also measure issue 15's suspects offline")
    parser.add_argument("--via-api", action="store_true",
                        help="also ingest into a real `appliance serve` and query it through the HTTP API")
    parser.add_argument("--api-only", action="store_true",
                        help="with --via-api: only the server and the baseline, not the in-process figures")
    parser.add_argument("--cold-server", action="store_true",
                        help="with --via-api: the server embeds everything itself (else its cache starts warm)")
    parser.add_argument("--render-stdlib", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--render-thirdparty", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.render_stdlib:
        render_pages(parsed.render_stdlib)
    elif parsed.render_thirdparty:
        render_third_party(parsed.render_thirdparty, parsed.seed)
    else:
        asyncio.run(main(parsed))
