"""RAG quality on long documents nobody on the project wrote: the standard library's modules rendered by `pydoc` as
whole plain-text pages (about 2,000 words each, some over 30,000), one known-item query per page (the first line
of the module's docstring), beside the docstring set of bench_rag (documents one or two chunks long).

Reports MRR, recall@1 and recall@10 per document for the appliance's vector, keyword and hybrid retrieval (through
RagService, in-process) and, in the same run, a plain baseline:
* vector: all-MiniLM-L6-v2 over the first four 128-word chunks of each page, a page scored by its best chunk;
* BM25: Okapi (k1 1.5, b 0.75) over whole pages, lower-cased words, English stop words removed;
* hybrid: reciprocal rank fusion (k 60) of the two page rankings.

The pages are rendered once in a child process (importing 500 modules has side effects) and kept in
.bench/pydoc-pages-<python>.json; embeddings are cached in .bench/embeddings so that a second run only embeds what
changed.

    .venv/bin/python -m tests.benchmarks.bench_rag_long --set long,docstrings
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
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appliance.auth.rbac import Rbac
from appliance.config import RagSettings
from appliance.observability.metrics import Metrics
from appliance.rag.embeddings import EmbeddingService
from appliance.rag.service import Incoming, RagService
from appliance.resources import shipped
from tests.benchmarks.bench_rag import ME, MODES, corpus, rank_of

BENCH = Path(__file__).resolve().parents[2] / ".bench"
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
        "pydoc_data", "__main__", "__phello__"}
RRF_K = 60
Pair = tuple[str, str, str]  # (document id, query, document text)
Ranks = list[int | None]


def render_pages(out: Path) -> None:
    """Every public standard-library module and submodule that imports, as (name, docstring's first line, page)."""
    import pydoc

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
    pages = []
    for name in names:
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
                page = pydoc.render_doc(module, renderer=pydoc.plaintext)
        except BaseException:
            continue
        first = (module.__doc__ or "").strip().split("\n")[0].strip()
        pages.append((name, first, page))
    out.write_text(json.dumps(pages))


def long_corpus(n: int, seed: int) -> list[Pair]:
    cached = BENCH / f"pydoc-pages-{sys.version_info[0]}.{sys.version_info[1]}.json"
    if not cached.exists():
        BENCH.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_rag_long", "--render", str(cached)],
                       check=True, cwd=BENCH.parent, stdout=subprocess.DEVNULL)
    pages = [(name, first, page) for name, first, page in json.loads(cached.read_text()) if len(first.split()) >= 4]
    counts = collections.Counter(first for _, first, _ in pages)
    unique = sorted(p for p in pages if counts[p[1]] == 1)
    random.Random(seed).shuffle(unique)
    return unique[:n]


# the plain baseline

def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

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
            "vector (as served: hnsw, 50 asked)": s50,
            "vector, 1000 asked (near exact), top 50": v50,
            "keyword (as served: pruned, chunk bm25)": k50,
            "keyword, no pruning": x50,
            "keyword, document bm25 (fts5, whole doc)": docs_bm25,
            "hybrid (as served: chunk rrf of 50 + 50)": keys_group(rrf([pk[:depth], sk]), doc_of),
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
    print(f"{'':<10} {'mode':<8} {'MRR':>6} {'R@1':>6} {'R@10':>6}")
    for who, ranks in rows.items():
        for mode, r in ranks.items():
            s = scores(r)
            print(f"{who:<10} {mode:<8} {s['mrr']:>6.3f} {s['recall@1']:>6.3f} {s['recall@10']:>6.3f}")


def evaluation_sets(names: Sequence[str], args: argparse.Namespace) -> dict[str, list[Pair]]:
    sets = {}
    for name in names:
        sets[name] = long_corpus(args.pages, args.seed) if name == "long" else corpus(args.docs, args.seed)
    return sets


async def main(args: argparse.Namespace) -> None:
    settings = RagSettings(job_threshold_bytes=1 << 40, chunk_tokens=args.chunk_tokens,
                           chunk_overlap=args.chunk_overlap)
    for name, pairs in evaluation_sets(args.set, args).items():
        words = [len(t.split()) for _, _, t in pairs]
        print(f"\n== {name}: {len(pairs)} documents, {sum(words) / len(words):.0f} words on average, "
              f"largest {max(words)}, Python {sys.version.split()[0]}")
        with tempfile.TemporaryDirectory() as tmp:
            rag, embeddings = open_service(Path(tmp), settings)
            took, chunks = await ingest(rag, pairs, name)
            print(f"ingested {chunks} chunks in {took:.0f} s")
            base = baseline_ranks(embeddings, pairs)
            ours = await appliance_ranks(rag, name, pairs)
            table(f"{name}: per document, top 10", {"baseline": base, "appliance": ours})
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", type=lambda s: s.split(","), default=["long", "docstrings"],
                        help="evaluation sets: long (pydoc pages), docstrings (bench_rag's corpus)")
    parser.add_argument("--pages", type=int, default=500, help="most pydoc pages in the long set")
    parser.add_argument("--docs", type=int, default=2000, help="documents in the docstring set")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--chunk-tokens", type=int, default=RagSettings().chunk_tokens, help="rag.chunk_tokens")
    parser.add_argument("--chunk-overlap", type=int, default=RagSettings().chunk_overlap, help="rag.chunk_overlap")
    parser.add_argument("--shares", type=lambda s: [float(x) for x in s.split(",")], default=[],
                        help="also measure keyword and hybrid with these common-term thresholds")
    parser.add_argument("--suspects", action="store_true", help="also measure issue 15's suspects offline")
    parser.add_argument("--render", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.render:
        render_pages(parsed.render)
    else:
        asyncio.run(main(parsed))
