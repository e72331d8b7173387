"""Prompt-lookup speculative decoding (issue 16, item 4): one stream answering from sources it quotes, decoded by the
worker's scheduler in-process with and without drafts, rounds alternating, same model, same prompts.

    .venv/bin/python -m tests.benchmarks.bench_lookup [--rounds 4] [--max-tokens 128] [--draft 8] [--threads 1]
        [--model GGUF] [--prompts rag|stories]

Each round decodes every prompt once per side (greedy, the prompt computed afresh each time) and measures tokens/s
over wall time and over the process's CPU time (steadier on a shared, loaded box), the decoding steps, and the
accepted share of drafted tokens. The text must be the same on both sides; the table shows medians of the per-round
ratios (drafts / none)."""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

from appliance.engines.llamacpp_runtime import LlamaRuntime, Piece
from appliance.engines.llamacpp_sampling import SamplingParams
from appliance.engines.llamacpp_scheduler import Job, Scheduler
from tests.benchmarks.bench_batching import plain_gguf, prompt


def decode(scheduler: Scheduler, tokens: list[int], max_tokens: int) -> tuple[str, float, float, dict[str, int]]:
    """One greedy answer from scratch: (text, wall s, CPU s, stats delta)."""
    scheduler.runtime.forget(0, -1)
    scheduler.slots[0].cached = []
    items: queue.Queue[Piece | BaseException] = queue.Queue()
    before = scheduler.stats()
    wall, cpu = time.perf_counter(), time.process_time()
    scheduler.submit(Job(list(tokens), SamplingParams(temperature=0, max_tokens=max_tokens), items.put, max_tokens))
    text = ""
    while True:
        item = items.get(timeout=600)
        if isinstance(item, BaseException):
            raise item
        text += item.text
        if item.finish_reason:
            break
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = scheduler.stats()
    return text, wall, cpu, {k: after[k] - before[k] for k in after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--draft", type=int, default=8, help="llamacpp.lookup_draft of the drafting side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", choices=("rag", "stories"), default="rag")
    parser.add_argument("--count", type=int, default=3, help="prompts per round")
    parser.add_argument("--model", help="a GGUF (default: the catalog's default model)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="appliance-bench-lookup-") as tmp, plain_gguf(args, Path(tmp)) as gguf:
        runtime = LlamaRuntime(str(gguf), n_ctx=2048, n_threads=args.threads, n_batch=2048, n_gpu_layers=0,
                               flash_attn=True)
        sides = {draft: Scheduler(runtime, lookup_draft=draft) for draft in (0, args.draft)}
        for scheduler in sides.values():  # one decodes at a time: the other waits for work
            scheduler.start()
        ratios: dict[str, list[float]] = {"wall": [], "cpu": [], "steps": []}
        accepted = drafted = generated = 0
        for r in range(args.rounds):
            totals: dict[int, list[float]] = {}
            texts: dict[int, list[str]] = {}
            for draft in (sides if r % 2 == 0 else list(sides)[::-1]):
                scheduler = sides[draft]
                tokens = wall = cpu = steps = 0.0
                for i in range(args.count):
                    messages = prompt(r * args.count + i, args.prompts)
                    ids = runtime.tokenize(runtime.chat_prompt(messages), is_chat=True)
                    text, w, c, stats = decode(scheduler, ids, args.max_tokens)
                    tokens += stats["generated_tokens"]
                    wall, cpu, steps = wall + w, cpu + c, steps + stats["steps"]
                    if draft:
                        accepted += stats["accepted_draft_tokens"]
                        drafted += stats["drafted_tokens"]
                        generated += stats["generated_tokens"]
                    texts.setdefault(draft, []).append(text)
                totals[draft] = [tokens / wall, tokens / cpu, steps]
            plain, with_drafts = totals[0], totals[args.draft]
            ratios["wall"].append(with_drafts[0] / plain[0])
            ratios["cpu"].append(with_drafts[1] / plain[1])
            ratios["steps"].append(with_drafts[2] / plain[2])
            if texts[0] != texts[args.draft]:
                print("MISMATCH: the drafted text differs from the plain one", file=sys.stderr)
                return 1
            print(f"  round {r + 1}: no drafts {plain[0]:.1f} tok/s ({plain[1]:.1f} per CPU s), drafts "
                  f"{with_drafts[0]:.1f} tok/s ({with_drafts[1]:.1f} per CPU s)", file=sys.stderr, flush=True)
        for scheduler in sides.values():
            scheduler.stop()
        runtime.close()
    print(f"\n## Prompt-lookup drafts ({args.prompts} prompts, {args.max_tokens} tokens, draft {args.draft}, "
          f"threads {args.threads}, {args.rounds} rounds x {args.count} prompts, "
          f"load at end {os.getloadavg()[0]:.1f})\n")
    print("| tok/s ratio, wall (median) | tok/s ratio, CPU time (median) | steps ratio | accepted / drafted | "
          "tokens from drafts |")
    print("|---|---|---|---|---|")
    print(f"| {statistics.median(ratios['wall']):.2f}x | {statistics.median(ratios['cpu']):.2f}x | "
          f"{statistics.median(ratios['steps']):.2f} | {accepted}/{drafted} ({accepted / max(drafted, 1):.0%}) | "
          f"{accepted / max(generated, 1):.0%} |")
    print("\nPer-round wall ratios: " + ", ".join(f"{x:.2f}" for x in ratios["wall"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
