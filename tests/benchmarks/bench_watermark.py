"""The watermark's detection rate, false positives and quality cost on the default model, through the real server.

    nice -n 10 .venv/bin/python -m tests.benchmarks.bench_watermark [--texts 16] [--tokens 200]
        [--temperatures 0.7,1.0] [--docstrings 3000] [--model GGUF] [--json PATH] [--enforce]

1. Watermarked texts: the real server with `[watermark] enabled` generates, for every temperature, --texts
   completions (/v1/completions, a story opening per text, seed = its number, end-of-generation banned so that each
   has --tokens tokens), all at once (one batch). Plain texts: the same prompts, seeds and sampling through the
   worker's own runtime and scheduler in this process, without the watermark, at the same time.
2. Detection rate: the share of watermarked texts whose first 50, 100 and 200 tokens (the completion re-tokenized by
   the model's tokenizer) reach z >= 4, scored with the box's key exactly as POST /api/watermark/detect scores
   (which is also asked about every whole text, and must agree). Target (issue 19): >= 0.9 at 200 tokens.
3. False positives: the share of the plain texts and of the standard library's docstrings (read with `ast`, not
   imported; those of >= 50 tokens, first --tokens tokens) flagged at z >= 4. Target: <= 1%.
4. Quality cost: the perplexity of each side's completions under the same model (raw logits, temperature 1, given
   its prompt; llama-cpp-python), pooled over tokens, per temperature; the ratio watermarked / plain.
5. The sampler's cost per token: adding delta to a 49k-vocabulary row with the green mask cached (most tokens) and
   computed afresh, against an arg-max over the row (what a greedy token costs without it).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import math
import random
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from appliance.config import physical_cores
from appliance.crypto.keyring import KeyRing
from appliance.watermark.green import DEFAULT_Z_THRESHOLD, GreenList, Watermark, score
from appliance.watermark.keys import WatermarkKeys
from tests.benchmarks.bench_batching import BENCH_MODEL, NO_EOS, BenchmarkError, plain_gguf
from tests.server import ServerProcess, appliance

GAMMA = 0.25
LENGTHS = (50, 100, 200)
OPENINGS = ["The old lighthouse keeper had not seen a ship in weeks when", "Nobody in the village believed the baker "
            "when she said", "The robot woke up in an empty warehouse and", "On the first morning of the Mars colony,",
            "The chess prodigy looked at the board and realised that", "Deep under the ocean, the diver found",
            "The clockmaker's last customer arrived at midnight with", "When the dragon refused to breathe fire, the "
            "king", "The time traveller's notebook began with a warning:", "Every summer the family drove to the lake, "
            "but this year", "The librarian noticed that one book was always returned", "At the edge of the desert "
            "stood a market where"]
TARGET_DETECTION, TARGET_FPR = 0.9, 0.01


@contextlib.contextmanager
def serving(data: Path, args: argparse.Namespace, watermark: bool) -> Iterator[ServerProcess]:
    env = {"APPLIANCE_MODELS__DEFAULT": BENCH_MODEL, "APPLIANCE_LLAMACPP__THREADS": str(args.threads),
           "APPLIANCE_LLAMACPP__PARALLEL": str(args.texts * len(args.temperatures)),
           "APPLIANCE_LLAMACPP__N_CTX": "1024",
           "APPLIANCE_CACHE__ENABLED": "false", "APPLIANCE_WATERMARK__ENABLED": str(watermark).lower(),
           "APPLIANCE_WATERMARK__GAMMA": str(GAMMA), "APPLIANCE_GATEWAY__REQUEST_TIMEOUT": "3600",
           "APPLIANCE_GATEWAY__QUEUE_TIMEOUT": "3600"}  # whole replies of a batch: slow on a busy box
    server = ServerProcess(data, env)
    try:
        yield server.start(wait_ready=True, timeout=600)
    finally:
        server.stop()


def generate_plain(gguf: Path, args: argparse.Namespace, temperatures: list[float]) -> dict[float, list[str]]:
    """The plain side: the same prompts, seeds and sampling through the worker's own runtime and scheduler (the
    same batching and sampler chain, without a watermark), all texts at once."""
    from appliance.engines.llamacpp_runtime import LlamaRuntime, Piece
    from appliance.engines.llamacpp_sampling import SamplingParams
    from appliance.engines.llamacpp_scheduler import Job, Scheduler

    runtime = LlamaRuntime(str(gguf), n_ctx=1024, n_threads=args.threads, n_batch=512, n_gpu_layers=0,
                           flash_attn=True, parallel=args.texts * len(temperatures))
    scheduler = Scheduler(runtime)
    scheduler.start()
    parts: dict[tuple[float, int], list[str]] = {}
    errors: list[BaseException] = []
    done = threading.Semaphore(0)

    def emit_to(cell: tuple[float, int]) -> Callable[[Piece | BaseException], None]:
        def emit(item: Piece | BaseException) -> None:
            if isinstance(item, BaseException):
                errors.append(item)
                done.release()
                return
            parts.setdefault(cell, []).append(item.text)
            if item.finish_reason is not None:
                done.release()
        return emit

    try:
        jobs = []
        for temperature in temperatures:
            for i in range(args.texts):
                params = SamplingParams(max_tokens=args.tokens + 16, temperature=temperature, seed=i,
                                        logit_bias={int(t): b for t, b in NO_EOS.items()})
                jobs.append(Job(runtime.tokenize(prompt_of(i), is_chat=False), params, emit_to((temperature, i)),
                                args.tokens + 16))
        scheduler.submit(*jobs)
        for _ in jobs:
            done.acquire()
    finally:
        scheduler.stop()
        runtime.close()
    if errors:
        raise BenchmarkError(f"plain generation failed: {errors[0]!r}")
    return {t: ["".join(parts[t, i]) for i in range(args.texts)] for t in temperatures}


def prompt_of(i: int) -> str:
    return f"Story {i}. {OPENINGS[i % len(OPENINGS)]}"


async def generate(server: ServerProcess, key: str, args: argparse.Namespace, temperature: float) -> list[str]:
    """--texts completions at `temperature`, all at once, in prompt order; each of --tokens + 16 tokens
    (re-tokenized, a text may come out a few tokens shorter)."""
    limit = asyncio.Semaphore(args.texts * len(args.temperatures))
    headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-store"}

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"model": BENCH_MODEL, "prompt": prompt_of(i), "max_tokens": args.tokens + 16,
                "temperature": temperature, "seed": i, "logit_bias": NO_EOS}
        async with limit:
            response = await client.post(server.url + "/v1/completions", json=body, headers=headers)
        if response.status_code != 200:
            raise BenchmarkError(f"HTTP {response.status_code}: {response.text[:300]}")
        return str(response.json()["choices"][0]["text"])

    async with httpx.AsyncClient(timeout=1800) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(args.texts))))


async def api_verdicts(server: ServerProcess, key: str, texts: list[str]) -> list[bool]:
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {key}"}) as client:
        verdicts = []
        for text in texts:
            response = await client.post(server.url + "/api/watermark/detect", json={"model": BENCH_MODEL,
                                                                                       "text": text})
            if response.status_code != 200:
                raise BenchmarkError(f"detect: HTTP {response.status_code}: {response.text[:300]}")
            verdicts.append(bool(response.json()["watermarked"]))
        return verdicts


def stdlib_docstrings(limit: int, seed: int = 0) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions (parsed, never imported)."""
    found: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        with contextlib.suppress(SyntaxError, ValueError, UnicodeDecodeError, OSError):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 200:
                        found.append(doc)
    unique = sorted(set(found))
    random.Random(seed).shuffle(unique)
    return unique[:limit]


def rates(token_lists: list[list[int]], green: GreenList, length: int) -> tuple[float, int]:
    """The share of texts flagged on their first `length` tokens, and how many texts had that many."""
    eligible = [tokens[:length] for tokens in token_lists if len(tokens) >= length]
    flagged = sum(score(tokens, green).watermarked(DEFAULT_Z_THRESHOLD) for tokens in eligible)
    return (flagged / len(eligible) if eligible else math.nan), len(eligible)


def perplexity(llm: Any, prompts: list[str], texts: list[str]) -> float:
    """exp(mean negative log-likelihood) of the completions' tokens given their prompts, pooled over tokens."""
    total, count = 0.0, 0
    for prompt, text in zip(prompts, texts, strict=True):
        head = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        tail = llm.tokenize(text.encode(), add_bos=False, special=False)
        tokens = (head + tail)[: llm.n_ctx()]
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
        rows = logits[len(head) - 1: len(tokens) - 1]
        peak = rows.max(axis=1, keepdims=True)
        log_z = (peak + np.log(np.exp(rows - peak).sum(axis=1, keepdims=True)))[:, 0]
        picked = rows[np.arange(len(rows)), tokens[len(head):]]
        total += float((log_z - picked).sum())
        count += len(rows)
    return math.exp(total / count)


def sampler_cost(n_vocab: int, rounds: int = 300) -> dict[str, float]:
    """Microseconds per token: the watermark's add with a cached mask, with a fresh one, and a bare arg-max."""
    green = GreenList(bytes(range(32)), n_vocab, GAMMA, cache=8)
    mark = Watermark(green, 2.0)
    row = np.random.default_rng(0).standard_normal(n_vocab).astype(np.float32)
    timings: dict[str, float] = {}
    for name, step in (("argmax", lambda i: row.argmax()), ("watermark, cached mask", lambda i: mark.apply(row, 1)),
                       ("watermark, new mask", lambda i: mark.apply(row, 1000 + i))):
        started = time.perf_counter()
        for i in range(rounds):
            step(i)
        timings[name] = (time.perf_counter() - started) / rounds * 1e6
    return timings


def detection_table(texts: dict[tuple[bool, float], list[str]], temperatures: list[float], green: GreenList,
                    tokens_of: Any, figures: dict[str, Any]) -> bool:
    print(f"{'':28}" + "".join(f"{f'{n} tokens':>14}" for n in LENGTHS))
    met = True
    for temperature in temperatures:
        for marked in (True, False):
            lists = [tokens_of(t) for t in texts[marked, temperature]]
            row = [rates(lists, green, n) for n in LENGTHS]
            label = f"{'detected' if marked else 'false pos. (plain)'} T={temperature}"
            print(f"{label:28}" + "".join(f"{r:>10.3f} ({k:>2})" if k else f"{'-':>14}" for r, k in row))
            cell = {str(n): r for n, (r, _) in zip(LENGTHS, row, strict=True)}
            figures["detection" if marked else "false_positives"][f"T={temperature}"] = cell
            full = row[-1][0]
            met &= (full >= TARGET_DETECTION) if marked else (full <= TARGET_FPR)
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=16, help="completions per temperature and side")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per completion")
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--docstrings", type=int, default=3000, help="standard-library docstrings scored at most")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads; 0 = physical cores")
    parser.add_argument("--model", help="a GGUF file (default: the default model from the catalog)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--enforce", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    args.threads = args.threads or physical_cores()
    temperatures = args.temperatures = [float(t) for t in args.temperatures.split(",")]
    started = time.monotonic()
    figures: dict[str, Any] = {"texts": args.texts, "tokens": args.tokens, "gamma": GAMMA, "delta": 2.0,
                               "z_threshold": DEFAULT_Z_THRESHOLD, "detection": {}, "false_positives": {},
                               "perplexity": {}}
    with tempfile.TemporaryDirectory(prefix="appliance-bench-watermark-") as tmp_name, \
            contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        gguf = stack.enter_context(plain_gguf(args, tmp))
        data = tmp / "data"
        appliance("init", data_dir=data)
        appliance("models", "pull", f"file:{gguf}", "--name", BENCH_MODEL, data_dir=data)
        key = appliance("keys", "create", "--name", "bench", "--role", "admin", data_dir=data).stdout.strip()
        key = key.splitlines()[-1]
        keys = data / "keys"
        green = GreenList(WatermarkKeys(KeyRing(keys), keys / "wrapped").model_key(BENCH_MODEL), 0, GAMMA)

        from llama_cpp import Llama

        llm = Llama(str(gguf), n_ctx=args.tokens + 96, logits_all=True, n_threads=args.threads, verbose=False)
        stack.callback(llm.close)

        def tokens_of(text: str) -> list[int]:
            return list(llm.tokenize(text.encode(), add_bos=False, special=False))

        print(f"watermark (gamma {GAMMA}, delta 2.0, z >= {DEFAULT_Z_THRESHOLD}) on the default model", flush=True)
        cost = sampler_cost(llm.n_vocab())
        figures["sampler_us_per_token"] = cost
        print("sampler cost per token (49k vocabulary): " + ", ".join(f"{k} {v:.0f} us" for k, v in cost.items()))
        docs = [tokens_of(d)[: args.tokens] for d in stdlib_docstrings(args.docstrings)]
        docs = [d for d in docs if len(d) >= 50]
        doc_z = [score(d, green).z_score for d in docs]
        doc_fpr = sum(z >= DEFAULT_Z_THRESHOLD for z in doc_z) / len(docs)
        met = doc_fpr <= TARGET_FPR
        figures["false_positives"]["stdlib docstrings"] = {"rate": doc_fpr, "count": len(docs),
                                                           "max_z": max(doc_z), "mean_z": float(np.mean(doc_z))}
        print(f"false positives on docstrings: {doc_fpr:.4f} of {len(docs)} standard-library docstrings of "
              f"50-{args.tokens} tokens (z mean {np.mean(doc_z):+.2f}, sd {np.std(doc_z):.2f}, max {max(doc_z):.2f})"
              f" ({time.monotonic() - started:.0f}s)", flush=True)
        texts: dict[tuple[bool, float], list[str]] = {}

        async def generate_all(server: ServerProcess) -> None:
            """Every watermarked text through the server and every plain one beside it, all at once."""
            plain = asyncio.create_task(asyncio.to_thread(generate_plain, gguf, args, temperatures))
            marked = await asyncio.gather(*(generate(server, key, args, t) for t in temperatures))
            for temperature, batch in zip(temperatures, marked, strict=True):
                texts[True, temperature] = batch
            print(f"  watermarked texts done ({time.monotonic() - started:.0f}s)", flush=True)
            for temperature, batch in (await plain).items():
                texts[False, temperature] = batch
            print(f"  plain texts done ({time.monotonic() - started:.0f}s)", flush=True)
            if args.json:
                Path(args.json).with_suffix(".texts.json").write_text(json.dumps(
                    {f"{'watermarked' if m else 'plain'} T={t}": v for (m, t), v in texts.items()}, indent=1))

        with serving(data, args, True) as server:
            asyncio.run(generate_all(server))
            api = asyncio.run(api_verdicts(server, key, [t for temp in temperatures for t in texts[True, temp]]))
        agree = sum(api) / len(api)
        figures["api_detected"] = agree
        print(f"  POST /api/watermark/detect flagged {agree:.3f} of {len(api)} whole watermarked texts", flush=True)
        print(f"\n{args.texts} texts per cell (texts long enough for the column)\n")
        met &= detection_table(texts, temperatures, green, tokens_of, figures)
        print(f"\nperplexity under the model (pooled over {args.texts} x {args.tokens} tokens)")
        for temperature in temperatures:
            prompts = [prompt_of(i) for i in range(args.texts)]
            wm, plain = (perplexity(llm, prompts, texts[m, temperature]) for m in (True, False))
            figures["perplexity"][f"T={temperature}"] = {"watermarked": wm, "plain": plain, "ratio": wm / plain}
            print(f"  T={temperature}: watermarked {wm:7.2f}   plain {plain:7.2f}   ratio {wm / plain:5.2f}")
        print(f"\ntargets (detection >= {TARGET_DETECTION} at {args.tokens} tokens, false positives <= "
              f"{TARGET_FPR:.0%}): {'met' if met else 'MISSED'}; {time.monotonic() - started:.0f}s in all")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if met or not args.enforce else 1


if __name__ == "__main__":
    sys.exit(main())
