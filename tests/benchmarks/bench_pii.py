"""PII detection quality and the streaming redactor's cost, each against a baseline measured in the same run.

  quality     precision and recall per entity type on tests/data/pii_eval.jsonl (planted, labelled values and
              hard negatives); a finding counts when it overlaps a labelled value of the same type
  cpu         the SSE redactor's work per streamed answer (128 chunks) against relaying the same bytes untouched
  ttft        time to first token through the real server with the output surface redacting (the shipped policy:
              secrets) against a policy that allows everything, switched through PUT /api/privacy/policy

    .venv/bin/python -m tests.benchmarks.bench_pii [--requests 12] [--no-server] [--enforce]

Target (issue 5): recall >= 0.98 and precision >= 0.95 on the checksum-validated types (credit_card, iban,
us_ssn); --enforce exits 1 when they are missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import msgspec

from appliance.privacy.detectors import builtin_detectors, detect
from appliance.privacy.gateway import SseRedactor
from appliance.privacy.policy import SHIPPED_PRIVACY, load_policy
from appliance.privacy.service import Privacy
from tests.server import DEFAULT_MODEL, ServerProcess, appliance

EVAL = Path(__file__).resolve().parents[1] / "data" / "pii_eval.jsonl"
CHECKSUM_TYPES = ("credit_card", "iban", "us_ssn")
ANSWER = ("Sure! Here is a short summary of the quarterly report. Revenue grew by 12 percent compared with the "
          "previous quarter, driven mostly by the new subscription tier, while costs stayed flat. The team expects "
          "similar growth next quarter if the launch in March goes to plan, and it will report again in June. ") * 2


def quality() -> tuple[dict[str, tuple[float, float, int]], bool]:
    detectors = builtin_detectors(("US",), ner="off")
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    misses: list[str] = []
    for line in EVAL.read_text().splitlines():
        row = json.loads(line)
        gold = [(e["type"], e["start"], e["end"]) for e in row["entities"]]
        found = [(e.type, e.start, e.end) for e in detect(row["text"], detectors)]
        matched: set[int] = set()
        for kind, start, end in found:
            hit = next((i for i, g in enumerate(gold) if g[0] == kind and start < g[2] and g[1] < end
                        and i not in matched), None)
            if hit is None:
                fp[kind] += 1
                misses.append(f"  false {kind}: {row['text'][start:end]!r}")
            else:
                matched.add(hit)
                tp[kind] += 1
        for i, (kind, start, end) in enumerate(gold):
            if i not in matched:
                fn[kind] += 1
                misses.append(f"  missed {kind}: {row['text'][start:end]!r}")
    results = {}
    for kind in sorted(set(tp) | set(fp) | set(fn)):
        precision = tp[kind] / (tp[kind] + fp[kind]) if tp[kind] + fp[kind] else 1.0
        recall = tp[kind] / (tp[kind] + fn[kind]) if tp[kind] + fn[kind] else 1.0
        results[kind] = (precision, recall, tp[kind] + fn[kind])
    for miss in misses[:20]:
        print(miss)
    ok = all(results[k][0] >= 0.95 and results[k][1] >= 0.98 for k in CHECKSUM_TYPES if k in results)
    return results, ok


def sse_chunks(text: str) -> list[bytes]:
    words = text.split(" ")
    pieces = [words[0]] + [" " + w for w in words[1:]]
    out = []
    for piece in pieces[:128]:
        body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}]}
        out.append(b"data: " + msgspec.json.encode(body) + b"\n\n")
    return out


def cpu(rounds: int = 20) -> tuple[float, float, int]:
    privacy = Privacy(load_policy(SHIPPED_PRIVACY), b"k" * 32)
    chunks = sse_chunks(ANSWER)

    def plain() -> None:
        for chunk in chunks:
            b"".join(e + b"\n\n" for e in chunk.split(b"\n\n") if e)

    def redacted() -> int:
        sse = SseRedactor(privacy)
        held = 0
        for chunk in chunks:
            out = b"".join(sse.event(e) for e in chunk.split(b"\n\n") if e)
            held += b'"content":""' in out
        sse.flush()
        return held

    base, red, held = [], [], 0
    for _ in range(rounds):
        start = time.perf_counter()
        plain()
        base.append(time.perf_counter() - start)
        start = time.perf_counter()
        held = redacted()
        red.append(time.perf_counter() - start)
    return statistics.median(base) * 1000, statistics.median(red) * 1000, held


def ttft(requests: int) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory(prefix="bench-pii-") as tmp:
        data = Path(tmp) / "data"
        appliance("init", data_dir=data)
        appliance("models", "pull", DEFAULT_MODEL, data_dir=data)
        key = appliance("keys", "create", "--name", "bench", "--role", "admin",
                        data_dir=data).stdout.strip().splitlines()[-1]
        server = ServerProcess(data).start()
        headers = {"Authorization": f"Bearer {key}"}
        shipped = SHIPPED_PRIVACY.read_text()
        allow_all = shipped.replace('[surfaces.output]\ndefault = "allow"\nsecret = "redact"',
                                    '[surfaces.output]\ndefault = "allow"')
        assert allow_all != shipped
        body = {"model": DEFAULT_MODEL, "stream": True, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Write one sentence about the sea."}]}

        def first_token() -> float:
            start = time.perf_counter()
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers,
                              timeout=120) as response:
                lines = response.iter_lines()
                for line in lines:
                    if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                        elapsed = time.perf_counter() - start
                        break
                else:
                    raise AssertionError("no text in the stream")
                for _ in lines:
                    pass
            return elapsed * 1000

        try:
            results: dict[str, list[float]] = {"allow": [], "redact": []}
            first_token()  # warm-up
            for _ in range(requests):  # interleaved, so that load on the box hits both alike
                for name, policy in (("allow", allow_all), ("redact", shipped)):
                    httpx.put(server.url + "/api/privacy/policy", json={"policy": policy},
                              headers=headers).raise_for_status()
                    results[name].append(first_token())
            return results["allow"], results["redact"]
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--no-server", action="store_true", help="skip the end-to-end TTFT measurement")
    parser.add_argument("--enforce", action="store_true")
    args = parser.parse_args(argv)
    results, ok = quality()
    print(f"\nquality on {EVAL.name} ({len(EVAL.read_text().splitlines())} texts):")
    print(f"  {'type':<12} {'precision':>9} {'recall':>7} {'planted':>8}")
    for kind, (precision, recall, planted) in results.items():
        mark = "  (checksum-validated)" if kind in CHECKSUM_TYPES else ""
        print(f"  {kind:<12} {precision:>9.3f} {recall:>7.3f} {planted:>8}{mark}")
    base, red, held = cpu()
    print(f"\nSSE relay CPU per 128-chunk answer: plain {base:.3f} ms, redacting {red:.3f} ms "
          f"(x{red / base:.1f}, +{(red - base) / 128 * 1000:.1f} us per chunk); chunks sent empty while held: {held}")
    if not args.no_server:
        allow, redact = ttft(args.requests)
        a, r = statistics.median(allow), statistics.median(redact)
        print(f"\nTTFT through the server, median of {args.requests}: output allowed {a:.1f} ms, output redacted "
              f"{r:.1f} ms (ratio {r / a:.2f}, added {r - a:+.1f} ms; the first word waits for the next chunk)")
    if args.enforce and not ok:
        print("target missed: checksum-validated types need recall >= 0.98 and precision >= 0.95", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
