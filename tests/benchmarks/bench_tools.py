"""Tool calling: what the grammar costs, and the appliance against llama.cpp's own `llama-server --jinja`.

    .venv/bin/python -m tests.benchmarks.bench_tools [--rounds 9] [--threads N] [--model GGUF]
        [--llama-server PATH | --no-reference] [--enforce]

(a) **Grammar overhead**, through the real server with auth: a `tool_choice: "required"` call (constrained by the
grammar built from the tool's schema) against a plain chat with the same prompt tokens (the tool prompt the worker
would write, put in the system message by hand) forced to the same number of completion tokens (max_tokens equal
to the call's, end-of-generation banned with logit_bias). Both stream, as agents do; rounds alternate which goes
first; the figure is the median of the per-round ratios of total time (target <= 1.1x). (A decode-only figure
would mislead: a call's first delta comes only once its name is written, some 15 tokens in.)

(b) **Against llama-server**: the same tool request (same messages, tools and tool_choice, non-streamed) to the
appliance and to llama-server `--jinja` built from the llama.cpp vendored in the pinned llama-cpp-python
(tests/benchmarks/build_llama_server.sh, cached in .bench/), same GGUF, threads, context and batch as
tests/benchmarks/bench_batching.py runs them. Throughput is completion tokens (from each reply's `usage`) over the
request's wall time; the figure is the median of per-round appliance/llama-server ratios (target >= 1.0x). The two
write calls in their own formats (llama-server's generic JSON `{"tool_call": ...}`, the appliance's
`<tool_call>[...]`), so their token counts and prompts differ: both are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from appliance.config import physical_cores
from appliance.engines.tool_calls import GENERIC_PROMPT, WHEN
from tests.benchmarks.bench_batching import (
    NO_EOS,
    BenchmarkError,
    Contender,
    appliance_server,
    build_reference,
    plain_gguf,
    reference_server,
)

SYSTEM = "You are a travel assistant. Use the tools to look things up."
QUESTIONS = ["Book me a table for four in Lyon tomorrow at 8 pm, somewhere quiet, vegetarian if possible.",
             "I need a table for two in Paris on Friday evening at 7:30, near the river.",
             "Reserve a table for six people in Marseille on Sunday at noon, with seafood.",
             "Find a restaurant table for three in Nice tonight at 9 pm, Italian food.",
             "Get me a table for two in Bordeaux next Saturday at 8 pm, with a wine list."]
TOOL = {"type": "function", "function": {
    "name": "reserve_table", "description": "Reserve a table at a restaurant.",
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["city", "party_size", "date", "time", "cuisine", "notes"],
                   "properties": {"city": {"type": "string"},
                                  "party_size": {"type": "integer", "minimum": 1, "maximum": 20},
                                  "date": {"type": "string", "description": "e.g. 2025-06-01 or 'tomorrow'"},
                                  "time": {"type": "string", "description": "24-hour, e.g. 20:00"},
                                  "cuisine": {"type": "string", "enum": ["any", "french", "italian", "seafood",
                                                                         "vegetarian"]},
                                  "notes": {"type": "string"}}}}}
TARGET_OVERHEAD = 1.1  # (a) tool call time / plain chat time, at most
TARGET_THROUGHPUT = 1.0  # (b) appliance tok/s / llama-server tok/s, at least


@dataclass
class Timing:
    total: float  # request sent -> reply complete (s)
    completion_tokens: int
    prompt_tokens: int


def tool_body(model: str, question: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False, "temperature": 0,
            "max_tokens": max_tokens}


def plain_body(model: str, question: str, tokens: int) -> dict[str, Any]:
    """A chat with no tools whose prompt is what the worker writes for `tool_body` (its generic tool prompt in the
    system message), forced to exactly `tokens` tokens."""
    function = TOOL["function"]
    described = json.dumps([{k: function[k] for k in ("name", "description", "parameters")}], ensure_ascii=False)
    system = f"{SYSTEM}\n\n{GENERIC_PROMPT.format(tools=described, when=WHEN['required'])}"
    return {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "temperature": 0, "max_tokens": tokens, "logit_bias": NO_EOS}


def timed(client: httpx.Client, who: Contender, body: dict[str, Any], stream: bool) -> Timing:
    headers = {**who.headers, "Cache-Control": "no-store"}
    body = {**body, "model": who.model}
    start = time.perf_counter()
    if not stream:
        response = client.post(who.url + "/v1/chat/completions", json=body, headers=headers)
        total = time.perf_counter() - start
        if response.status_code != 200:
            raise BenchmarkError(f"{who.name}: HTTP {response.status_code}: {response.text[:300]}")
        reply = response.json()
        if "tools" in body and not reply["choices"][0]["message"].get("tool_calls"):
            raise BenchmarkError(f"{who.name}: no tool call in {reply['choices'][0]['message']}")
        return Timing(total, reply["usage"]["completion_tokens"], reply["usage"]["prompt_tokens"])
    usage, called = None, False
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", who.url + "/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise BenchmarkError(f"{who.name}: HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            called |= any((c.get("delta") or {}).get("tool_calls") for c in chunk.get("choices") or ())
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    if usage is None or ("tools" in body and not called):
        raise BenchmarkError(f"{who.name}: the stream ended without {'usage' if called else 'a tool call'}")
    return Timing(end - start, usage["completion_tokens"], usage["prompt_tokens"])


# ---------------------------------------------------------------- (a) grammar overhead


def grammar_overhead(app: Contender, args: argparse.Namespace) -> tuple[list[float], list[Timing]]:
    """Per-round ratios (tool / plain) of total time, and the tool calls' timings."""
    totals, calls = [], []
    with httpx.Client(timeout=600) as client:
        warm = timed(client, app, tool_body(app.model, QUESTIONS[0], args.max_tokens), stream=True)
        timed(client, app, plain_body(app.model, QUESTIONS[0], warm.completion_tokens), stream=True)
        for r in range(args.rounds):
            question = QUESTIONS[r % len(QUESTIONS)]
            if r % 2 == 0:
                call = timed(client, app, tool_body(app.model, question, args.max_tokens), stream=True)
                plain = timed(client, app, plain_body(app.model, question, call.completion_tokens), stream=True)
            else:  # the plain chat first, guessing the call's length from the last round (a wrong guess is redone)
                tokens = calls[-1].completion_tokens if calls else args.max_tokens
                plain = timed(client, app, plain_body(app.model, question, tokens), stream=True)
                call = timed(client, app, tool_body(app.model, question, args.max_tokens), stream=True)
            if plain.completion_tokens != call.completion_tokens:  # the odd round guessed the length wrong: redo
                plain = timed(client, app, plain_body(app.model, question, call.completion_tokens), stream=True)
            if plain.completion_tokens != call.completion_tokens:
                raise BenchmarkError(f"the plain chat made {plain.completion_tokens} tokens, not "
                                     f"{call.completion_tokens}: the logit_bias ban on end-of-generation did not hold")
            if plain.prompt_tokens != call.prompt_tokens:
                print(f"  note: prompt tokens differ (call {call.prompt_tokens}, plain {plain.prompt_tokens}): the "
                      "worker's tool prompt changed; update plain_body", file=sys.stderr)
            calls.append(call)
            totals.append(call.total / plain.total)
            print(f"  (a) round {r + 1}: {call.completion_tokens} tokens, call {call.total:.3f} s, plain "
                  f"{plain.total:.3f} s, ratio {totals[-1]:.2f}", file=sys.stderr, flush=True)
    return totals, calls


# ---------------------------------------------------------------- (b) against llama-server


def against_reference(app: Contender, ref: Contender, args: argparse.Namespace
                      ) -> tuple[list[float], dict[str, list[Timing]]]:
    """Per-round tok/s ratios; a round where either side answers without a call is reported and left out."""
    ratios: list[float] = []
    timings: dict[str, list[Timing]] = {app.name: [], ref.name: []}
    with httpx.Client(timeout=600) as client:
        for r in range(args.rounds):
            question = QUESTIONS[r % len(QUESTIONS)]
            got: dict[str, Timing] = {}
            for who in (app, ref) if r % 2 == 0 else (ref, app):
                try:
                    got[who.name] = timed(client, who, tool_body(who.model, question, args.max_tokens), stream=False)
                except BenchmarkError as exc:
                    print(f"  (b) round {r + 1} left out: {str(exc)[:200]}", file=sys.stderr, flush=True)
            if len(got) < 2:
                continue
            for name, timing in got.items():
                timings[name].append(timing)
            a, b = got[app.name], got[ref.name]
            ratios.append((a.completion_tokens / a.total) / (b.completion_tokens / b.total))
            print(f"  (b) round {r + 1}: appliance {a.completion_tokens} tok in {a.total:.3f} s, llama-server "
                  f"{b.completion_tokens} tok in {b.total:.3f} s, ratio {ratios[-1]:.2f}", file=sys.stderr,
                  flush=True)
    return ratios, timings


# ---------------------------------------------------------------- report


def report(overhead: tuple[list[float], list[Timing]],
           reference: tuple[list[float], dict[str, list[Timing]]] | None, args: argparse.Namespace) -> bool:
    totals, calls = overhead
    ratio = statistics.median(totals)
    met = ratio <= TARGET_OVERHEAD
    print(f"\n## Tool calling (threads={args.threads}, {args.rounds} rounds, load at end {os.getloadavg()[0]:.1f})\n")
    print("| measure | figure | target |")
    print("|---|---|---|")
    print(f"| (a) required tool call / plain chat, same prompt and completion tokens (median "
          f"{statistics.median(c.completion_tokens for c in calls):.0f} tokens, prompt {calls[0].prompt_tokens}): "
          f"total time, median of per-round ratios | {ratio:.2f}x | <= {TARGET_OVERHEAD} "
          f"{'ok' if met else 'MISSED'} |")
    print(f"| (a) tool call median total time | {statistics.median(c.total for c in calls) * 1000:.0f} ms | |")
    if reference is not None and not reference[0]:
        print(f"| (b) appliance / llama-server --jinja | no round where both made a call | >= {TARGET_THROUGHPUT} |")
        met = False
    elif reference is not None:
        ratios, timings = reference
        paired = statistics.median(ratios)
        ok = paired >= TARGET_THROUGHPUT
        met &= ok
        for name, values in timings.items():
            tps = statistics.median(t.completion_tokens / t.total for t in values)
            tokens = statistics.median(t.completion_tokens for t in values)
            print(f"| (b) {name}: tool call tok/s (median; completion {tokens:.0f} tokens, prompt "
                  f"{values[0].prompt_tokens}) | {tps:.1f} | |")
        print(f"| (b) appliance / llama-server --jinja tok/s, median of per-round ratios | {paired:.2f}x | "
              f">= {TARGET_THROUGHPUT} {'ok' if ok else 'MISSED'} |")
    print(f"\nPer-round (a) total ratios: {[round(x, 2) for x in totals]}")
    if reference is not None:
        print(f"Per-round (b) tok/s ratios: {[round(x, 2) for x in reference[0]]}")
    return met


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="rounds of each comparison (default 9)")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of a tool call (default 256)")
    parser.add_argument("--threads", type=int, default=0, help="threads for both servers (default: physical cores)")
    parser.add_argument("--n-ctx", type=int, default=1024, help="context for both (default 1024)")
    parser.add_argument("--n-batch", type=int, default=512, help="batch size for both (default 512)")
    parser.add_argument("--model", help="a GGUF for both sides (default: the catalog's default model)")
    parser.add_argument("--llama-server", help="a llama-server binary (default: build or reuse .bench/'s)")
    parser.add_argument("--no-reference", action="store_true", help="measure (a) only, without llama-server")
    parser.add_argument("--enforce", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    args.threads = args.threads or physical_cores()
    # what bench_batching's server helpers read: one sequence at a time, the default stream interval
    args.concurrency, args.stream_interval_ms = [1], None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = None if args.no_reference else build_reference(args)
    with tempfile.TemporaryDirectory(prefix="appliance-bench-tools-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        gguf = stack.enter_context(plain_gguf(args, tmp))
        app = stack.enter_context(appliance_server(gguf, tmp, args))
        overhead = grammar_overhead(app, args)
        reference = None
        if binary is not None:
            ref = stack.enter_context(reference_server(binary, gguf, args, extra=["--jinja"]))
            reference = against_reference(app, ref, args)
        met = report(overhead, reference, args)
    return 0 if met or not args.enforce else 1


if __name__ == "__main__":
    raise SystemExit(main())
