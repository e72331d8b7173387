"""RAG benchmark on a corpus nobody on the project wrote: the Python standard library's docstrings (the first line of
a function's, class's or module's docstring is the query, the rest is the document).

Measures, in one run, in-process (no HTTP, no LLM):
* retrieval quality: recall@1, recall@10 and MRR for vector, keyword and hybrid (per document);
* ingestion throughput of RagService (parse, privacy policy, chunk, embed with the cache cold, write Chroma and
  FTS5) against sentence-transformers encoding the same chunk texts directly (target >= 0.9x), in wall-clock time
  and in this process's CPU time (on a shared box the wall clock also counts other people's load, which changes
  between the two measurements);
* query latency p50/p95 per mode at 10k and 100k chunks (target: hybrid p95 <= 50 ms). The larger collections
  are filled with the corpus's real chunks and vectors, repeated with a little noise on the vectors and a variant
  word in the text, so that sizes can be reached without hours of embedding; each query still embeds its text.
* with --chroma-server: the same latencies with the vectors on a Chroma server (`chroma run`, started here on
  loopback, so the figure is the cost of HTTP and JSON, not of a network), the same collections filled in both, each
  query timed against embedded Chroma then against the server, and the ratio of the hybrid p95s.

    .venv/bin/python -m tests.benchmarks.bench_rag --docs 2000 --sizes 10000,100000
    .venv/bin/python -m tests.benchmarks.bench_rag --docs 2000 --sizes 100000 --latency-only
    .venv/bin/python -m tests.benchmarks.bench_rag --docs 2000 --sizes 100000 --latency-only --chroma-server

`--latency-only` measures the query latency alone, embedding the corpus through the embedding cache kept in
.bench/embeddings (shared with bench_rag_long), so that a second run takes minutes: for a quiet moment on a shared box.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import os
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from appliance.auth.keys import Principal
from appliance.auth.rbac import Rbac
from appliance.config import RagSettings
from appliance.observability.metrics import Metrics
from appliance.privacy.policy import load_policy
from appliance.privacy.service import Privacy
from appliance.rag.chunking import Chunk
from appliance.rag.embeddings import EmbeddingService
from appliance.rag.index import NewDocument
from appliance.rag.jobs import Incoming
from appliance.rag.service import RagService
from appliance.rag.vectors import ChromaServer
from appliance.resources import shipped
from tests.chroma_server import ChromaRun

BENCH = Path(__file__).resolve().parents[2] / ".bench"
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "lib2to3", "turtledemo", "site-packages", "ensurepip", "pydoc_data"}
MODES = ("vector", "keyword", "hybrid")
ME = Principal(key_id="bench", name="bench", role="admin")


def stdlib_pairs() -> Iterator[tuple[str, str, str]]:
    """(id, query, document) from docstrings whose first line is a sentence and whose rest says more."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first, _, rest = doc.strip().partition("\n")
            rest = rest.strip()
            if len(first.split()) >= 4 and len(rest) >= 120 and len(rest.split()) >= 20:
                name = getattr(node, "name", "")
                yield (f"{module}.{name}:{getattr(node, 'lineno', 0)}" if name else module), first.strip(), rest


def corpus(n: int, seed: int) -> list[tuple[str, str, str]]:
    pairs = list(stdlib_pairs())
    counts: dict[str, int] = {}
    for _, query, _ in pairs:
        counts[query] = counts.get(query, 0) + 1
    unique = [p for p in pairs if counts[p[1]] == 1]  # a query two documents answer cannot be scored
    random.Random(seed).shuffle(unique)
    return unique[:n]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rank_of(results: list[Any], wanted: str) -> int | None:
    for rank, result in enumerate(results, start=1):
        if result.chunk.document_id == wanted:
            return rank
    return None


async def quality(rag: RagService, pairs: list[tuple[str, str, str]], collection: str) -> dict[str, dict[str, float]]:
    out = {}
    for mode in MODES:
        ranks = []
        for doc_id, query, _ in pairs:
            results = await rag.query(ME, [collection], query, top_k=10, mode=mode, per_document=1)  # type: ignore[arg-type]
            ranks.append(rank_of(results, doc_id))
        out[mode] = {"recall@1": sum(r == 1 for r in ranks) / len(ranks),
                     "recall@10": sum(r is not None for r in ranks) / len(ranks),
                     "mrr": sum(1 / r for r in ranks if r) / len(ranks)}
    return out


class Took(NamedTuple):
    """Wall-clock seconds, and CPU seconds of this process (all its threads): on a box shared with others the
    wall clock also counts their load, which changes from one minute to the next; CPU time counts only our work."""

    wall: float
    cpu: float

    @staticmethod
    def now() -> Took:
        return Took(time.perf_counter(), time.process_time())

    def since(self) -> Took:
        return Took(time.perf_counter() - self.wall, time.process_time() - self.cpu)


async def ingest(rag: RagService, pairs: list[tuple[str, str, str]], collection: str) -> tuple[Took, int]:
    docs = [Incoming(doc_id, text.encode(), "text", {}) for doc_id, _, text in pairs]
    started = Took.now()
    chunks = 0
    for start in range(0, len(docs), 500):
        result = await rag.add_documents(ME, collection, docs[start : start + 500])
        chunks += int(result.get("chunks", 0))
    return started.since(), chunks


def baseline(rag: RagService, pairs: list[tuple[str, str, str]]) -> Took:
    """sentence-transformers on the very chunk texts the service embedded, one call, same batch size."""
    model = rag.embeddings.model
    texts: list[str] = []
    for doc_id, _, _text in pairs:
        rows = rag.index.chunks([k for k in _chunk_keys(rag, doc_id)])
        texts += [f"{c.heading}\n{c.text}" if c.heading else c.text for c in rows.values()]
    started = Took.now()
    model.model.encode(texts, batch_size=rag.settings.embedding_batch, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return started.since()


def _chunk_keys(rag: RagService, doc_id: str) -> list[int]:
    conn = rag.index._connection()
    first = conn.execute("SELECT collection_id FROM chunks WHERE document_id = ? LIMIT 1", (doc_id,)).fetchone()
    return [int(r[0]) for r in conn.execute("SELECT id FROM chunks WHERE document_id = ? AND collection_id = ?",
                                            (doc_id, first[0]))]


def fill(rag: RagService, collection_id: str, source: list[tuple[Chunk, np.ndarray]], size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch: list[NewDocument] = []
    for i in range(size):
        chunk, vector = source[i % len(source)]
        noisy = vector + rng.normal(0, 0.03, vector.shape).astype(np.float32)
        noisy /= np.linalg.norm(noisy)
        variant = Chunk(0, chunk.headings, f"{chunk.text} variant{i // len(source)}")
        batch.append(NewDocument(f"s{i}", [variant], noisy.reshape(1, -1), {}, len(chunk.text)))
        if len(batch) == 2000:
            rag.index.put_documents(collection_id, batch, "bench")
            batch = []
    if batch:
        rag.index.put_documents(collection_id, batch, "bench")


async def latency(stores: list[RagService], collection: str, queries: list[str]
                  ) -> list[dict[str, tuple[float, float]]]:
    """p50 and p95 per mode for each store; each query runs against every store in turn, so a change in the box's
    load weighs on all of them alike. One query per store and mode goes first, untimed: Chroma loads a freshly
    filled index on its first query."""
    out: list[dict[str, tuple[float, float]]] = [{} for _ in stores]
    for mode in MODES:
        for rag in stores:
            await rag.query(ME, [collection], queries[-1], top_k=5, mode=mode)  # type: ignore[arg-type]
        times: list[list[float]] = [[] for _ in stores]
        for query in queries:
            for rag, took in zip(stores, times, strict=True):
                started = time.perf_counter()
                await rag.query(ME, [collection], query, top_k=5, mode=mode)  # type: ignore[arg-type]
                took.append((time.perf_counter() - started) * 1000)
        for seen, took in zip(out, times, strict=True):
            seen[mode] = (percentile(took, 50), percentile(took, 95))
    return out


async def ingestion_and_quality(rag: RagService, embeddings: EmbeddingService, pairs: list[tuple[str, str, str]],
                                took: Took, chunks: int, args: argparse.Namespace) -> None:
    """The ingestion rounds against sentence-transformers alone, then the retrieval quality."""
    direct = baseline(rag, pairs)
    rounds = [(took, direct)]
    print(f"\ningestion: {chunks} chunks of {len(pairs)} documents in {took.wall:.1f} s "
          f"({chunks / took.wall:.1f} chunks/s); sentence-transformers alone on the same chunks: "
          f"{direct.wall:.1f} s ({chunks / direct.wall:.1f} chunks/s); load average {_load()}")
    for again in range(1, args.ingest_rounds):  # again with the cache cold, into a fresh collection
        embeddings.cache.clear()
        await rag.create_collection(ME, f"stdlib{again}")
        took, _ = await ingest(rag, pairs, f"stdlib{again}")
        direct = baseline(rag, pairs)
        rounds.append((took, direct))
        print(f"  round {again + 1}: ours {took.wall:.1f} s, alone {direct.wall:.1f} s; load average {_load()}")
    print("ingestion throughput ratio (ours / sentence-transformers alone, target >= 0.9x):")
    for what in ("wall", "cpu"):
        ratios = [getattr(direct, what) / getattr(took, what) for took, direct in rounds]
        seconds = ", ".join(f"{getattr(t, what):.0f}/{getattr(d, what):.0f} s" for t, d in rounds)
        print(f"  {what + ' time':<9} {', '.join(f'{r:.3f}x' for r in ratios)}; median "
              f"{statistics.median(ratios):.3f}x (ours/alone: {seconds})")

    print("\nretrieval quality (per document, top 10):")
    print(f"{'mode':<8} {'recall@1':>9} {'recall@10':>10} {'MRR':>7}")
    for mode, q in (await quality(rag, pairs, "stdlib")).items():
        print(f"{mode:<8} {q['recall@1']:>9.3f} {q['recall@10']:>10.3f} {q['mrr']:>7.3f}")


async def main(args: argparse.Namespace) -> None:
    pairs = corpus(args.docs, args.seed)
    print(f"corpus: {len(pairs)} docstrings from the standard library of Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Metrics()
        settings = RagSettings()
        cache = BENCH / "embeddings" if args.latency_only else Path(tmp) / "cache"
        embeddings = EmbeddingService(settings, cache, metrics)
        rag = RagService(settings, Path(tmp) / "rag", embeddings, Rbac.load(shipped("policies/rbac.toml")),
                         metrics)
        rag.privacy = Privacy(load_policy(), b"\0" * 32)  # the shipped policy's `rag` surface, as the server runs it
        await rag.create_collection(ME, "warmup")  # first-use costs (Chroma, detectors, torch threads) not timed
        await ingest(rag, [(f"w{i}", "w", f"Warm-up text number {i}, to be ignored. " * 20) for i in range(20)],
                     "warmup")
        await rag.create_collection(ME, "stdlib")
        took, chunks = await ingest(rag, pairs, "stdlib")
        if not args.latency_only:
            await ingestion_and_quality(rag, embeddings, pairs, took, chunks, args)

        source = []
        keys = [k for doc_id, _, _ in pairs for k in _chunk_keys(rag, doc_id)]
        stored = rag.index.chunks(keys)
        for key in keys:
            chunk = stored[key]
            text = f"{chunk.heading}\n{chunk.text}" if chunk.heading else chunk.text
            vector = (await embeddings.embed([text])).vectors[0]  # from the cache
            source.append((Chunk(0, tuple(chunk.heading.split(" > ")) if chunk.heading else (), chunk.text), vector))
        queries = [q for _, q, _ in pairs[: args.queries]]
        await scale_latency(args, rag, source, queries, Path(tmp))
        embeddings.close()


async def scale_latency(args: argparse.Namespace, rag: RagService, source: list[tuple[Chunk, np.ndarray]],
                        queries: list[str], tmp: Path) -> None:
    """Query latency at each size, with embedded Chroma and (--chroma-server) a Chroma server side by side."""
    stores, labels, chroma = [rag], ["embedded"], None
    if args.chroma_server:
        chroma = ChromaRun(tmp / "chroma-server").start()
        server_settings = RagSettings(chroma_url=chroma.url)
        stores.append(RagService(server_settings, tmp / "rag-server", rag.embeddings, rag.rbac, rag.metrics,
                                 server=ChromaServer.from_settings(server_settings, tmp / "keys")))
        labels.append("server")
    print(f"\nquery latency, top 5, {len(queries)} queries each (embedding the query included, no LLM):")
    print(f"{'chunks':>8} {'chroma':<9} {'mode':<8} {'p50 ms':>8} {'p95 ms':>8}")
    try:
        for size in args.sizes:
            name = f"scale{size}"
            filled = []
            for store in stores:
                created = await store.create_collection(ME, name)
                fill_started = time.perf_counter()
                collection_id = store.index.collection(created["name"])["id"]  # type: ignore[index]
                fill(store, collection_id, source, size, args.seed)
                filled.append(f"{time.perf_counter() - fill_started:.0f} s")
            measured = await latency(stores, name, queries)
            for label, seen in zip(labels, measured, strict=True):
                for mode, (p50, p95) in seen.items():
                    print(f"{size:>8} {label:<9} {mode:<8} {p50:>8.1f} {p95:>8.1f}")
            if len(measured) == 2:
                print(f"{'':>8} hybrid p95, Chroma server / embedded: "
                      f"{measured[1]['hybrid'][1] / measured[0]['hybrid'][1]:.2f}x "
                      f"(+{measured[1]['hybrid'][1] - measured[0]['hybrid'][1]:.1f} ms)")
            print(f"{'':>8} (filled in {' and '.join(filled)}; load average {_load()})")
    finally:
        for store in stores:
            store.close()
        if chroma is not None:
            chroma.stop()


def _load() -> str:
    """The box's load average over 1, 5 and 15 minutes (2 cores: above 2, others wait for a core)."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2000, help="documents in the quality/ingestion corpus")
    parser.add_argument("--queries", type=int, default=200, help="queries per mode for latency")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000],
                        help="collection sizes in chunks for latency, comma-separated")
    parser.add_argument("--ingest-rounds", type=int, default=3, help="ingestion rounds (cache cleared between)")
    parser.add_argument("--chroma-server", action="store_true",
                        help="also measure latency with the vectors on a Chroma server (`chroma run` on loopback)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--latency-only", action="store_true",
                        help="query latency only, the corpus embedded through the cache in .bench/embeddings")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
