"""Gateway against llama-cpp-python used directly: completion tokens/s and time to first token, as ratios.

    .venv/bin/python -m tests.benchmarks.bench_gateway [--rounds 10] [--data-dir DIR | --model GGUF] [--enforce]

Both sides load the same GGUF with the same threads, context, batch and flash-attention settings, decode
greedily from the same prompt, stream, and are forced to generate exactly --max-tokens tokens (every
end-of-generation token is banned with logit_bias). Rounds are interleaved: in each round every contender
streams one completion, starting one further along the list each round, so all see the same machine
conditions; the idle side (a loaded Llama, an idle worker) uses no CPU while the other runs.

Contenders, first the completion phase (one prompt), then the chat phase (one message):
  direct               llama_cpp.Llama.create_completion(stream=True) in this process: the baseline
  gateway/openai       POST /v1/completions through the gateway with the official openai SDK: the target
  gateway/httpx        the same through the gateway with raw httpx (separates the SDK's own cost)
  worker/httpx         the same straight to the worker's Unix socket (separates the gateway hop)
  direct-chat          Llama.create_chat_completion(stream=True)
  gateway-chat/openai  POST /v1/chat/completions with the openai SDK (informational: the two sides render
                       the chat template with different code)

By default every request of a phase has the same prompt, so after warm-up both sides reuse the prompt's KV
cache and TTFT is one decode step plus overhead: the purest view of what the gateway adds. --fresh-prompts
gives each request its own prompt prefix, so TTFT includes processing the whole prompt.

The CPU columns say where the work happened: seconds of CPU per request in this process (the client; for
direct, llama.cpp itself), in the gateway process and in the worker process.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

from tests.server import DEFAULT_MODEL, ServerProcess, appliance

TARGET_TOKS_RATIO = 0.95
TARGET_TTFT_OVERHEAD_MS = 15.0
HEADLINE = "gateway/openai"
DEFAULT_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg of Mainz "
    "combined movable metal type, oil-based ink and a wooden screw press. Explain in detail how"
)
BENCH_MODEL_NAME = "bench-model"
ROLES = ("client", "gateway", "worker")
BUSY_LOAD = 0.5  # 1-minute load average above which the report warns that the numbers are noisy


class BenchmarkError(Exception):
    """The benchmark could not measure what it promises (wrong token count, a failed server ...)."""


@dataclass(frozen=True)
class Request:
    """What every contender is asked for: one prompt, greedy, exactly max_tokens tokens."""

    prompt: str
    max_tokens: int
    banned: tuple[int, ...]  # end-of-generation token ids

    def bias(self) -> dict[int, float]:
        return {t: -100.0 for t in self.banned}

    def wire_bias(self) -> dict[str, int]:
        return {str(t): -100 for t in self.banned}

    def messages(self) -> list[Any]:
        return [{"role": "user", "content": self.prompt}]


@dataclass
class Sample:
    """One streamed completion as its client saw it, and the CPU it cost each process."""

    ttft: float  # seconds from the call to the first chunk carrying text
    total: float  # seconds from the call to the end of the stream
    last_text: float  # seconds from the call to the last chunk carrying text
    tokens: int
    text: str
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total

    @property
    def decode_tokens_per_s(self) -> float:
        span = self.last_text - self.ttft
        return (self.tokens - 1) / span if span > 0 else float("nan")


@dataclass
class Contender:
    name: str
    run: Callable[[Request], Sample]
    baseline: str | None = None  # the contender its ratios are taken against
    samples: list[Sample] = field(default_factory=list)


@dataclass(frozen=True)
class EngineSettings:
    threads: int
    n_ctx: int
    n_batch: int
    flash_attn: bool
    n_gpu_layers: int


# ---------------------------------------------------------------- measuring


class Stopwatch:
    """Times a stream of text pieces: the first text, the last text, the end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = 0.0
        self.parts: list[str] = []

    def text(self, piece: str | None) -> None:
        if piece:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            self.last = now
            self.parts.append(piece)

    def done(self, tokens: int, what: str, request: Request) -> Sample:
        end = time.perf_counter()
        if self.first is None:
            raise BenchmarkError(f"{what}: the stream carried no text")
        if tokens != request.max_tokens:
            raise BenchmarkError(f"{what}: generated {tokens} tokens, not {request.max_tokens}; the ban on "
                                 "end-of-generation tokens did not hold, so the sides would not be comparable")
        return Sample(self.first - self.start, end - self.start, self.last - self.start, tokens,
                      "".join(self.parts))


class CpuMeter:
    """CPU seconds (user + system) spent by this process, the gateway and the worker during one request."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes

    def _now(self) -> dict[str, float]:
        out = {}
        for role, process in self.processes.items():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                out[role] = times.user + times.system
        return out

    def measure(self, run: Callable[[], Sample]) -> Sample:
        before = self._now()
        sample = run()
        after = self._now()
        sample.cpu = {role: after[role] - before[role] for role in after if role in before}
        return sample


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ---------------------------------------------------------------- the direct side


class DirectLlama:
    """llama-cpp-python driven the way its users drive it, in this process."""

    def __init__(self, model_path: Path, engine: EngineSettings) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(model_path), n_ctx=engine.n_ctx, n_threads=engine.threads,
                         n_threads_batch=engine.threads, n_batch=engine.n_batch, n_gpu_layers=engine.n_gpu_layers,
                         flash_attn=engine.flash_attn, verbose=False)

    def end_of_generation_tokens(self) -> tuple[int, ...]:
        import llama_cpp

        vocab = self.llm._model.vocab
        eog = tuple(t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))
        if self.llm.token_eos() not in eog:
            raise BenchmarkError(f"token_eos() = {self.llm.token_eos()} is not among the EOG tokens {eog}")
        return eog

    def token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def completion(self, request: Request) -> Sample:
        watch, finish = Stopwatch(), None
        chunk: Any
        for chunk in self.llm.create_completion(request.prompt, max_tokens=request.max_tokens, temperature=0,
                                                stream=True, logit_bias=request.bias()):
            choice = chunk["choices"][0]
            watch.text(choice["text"])
            finish = choice["finish_reason"] or finish
        return watch.done(request.max_tokens if finish == "length" else -1, "direct completion", request)

    def chat(self, request: Request) -> Sample:
        watch, finish = Stopwatch(), None
        chunk: Any
        for chunk in self.llm.create_chat_completion(request.messages(), max_tokens=request.max_tokens,
                                                     temperature=0, stream=True, logit_bias=request.bias()):
            choice = chunk["choices"][0]
            watch.text(choice["delta"].get("content"))
            finish = choice["finish_reason"] or finish
        return watch.done(request.max_tokens if finish == "length" else -1, "direct chat", request)

    def close(self) -> None:
        self.llm.close()
        del self.llm
        gc.collect()


# ---------------------------------------------------------------- the gateway side


class GatewayClients:
    """Clients of a running server: the openai SDK, raw httpx, and raw httpx on the worker's own socket."""

    def __init__(self, url: str, key: str, worker_socket: Path | None, model: str) -> None:
        self.model = model
        self.sdk = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
        self.worker = (httpx.Client(transport=httpx.HTTPTransport(uds=str(worker_socket)), base_url="http://worker",
                                    timeout=600) if worker_socket else None)

    def close(self) -> None:
        self.sdk.close()
        self.http.close()
        if self.worker is not None:
            self.worker.close()

    def sdk_completion(self, request: Request) -> Sample:
        watch, tokens = Stopwatch(), -1
        stream = self.sdk.completions.create(model=self.model, prompt=request.prompt, max_tokens=request.max_tokens,
                                             temperature=0, stream=True, logit_bias=request.wire_bias(),
                                             stream_options={"include_usage": True})
        for chunk in stream:
            for choice in chunk.choices:
                watch.text(choice.text)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return watch.done(tokens, "gateway completion (openai SDK)", request)

    def sdk_chat(self, request: Request) -> Sample:
        watch, tokens = Stopwatch(), -1
        stream = self.sdk.chat.completions.create(
            model=self.model, messages=request.messages(),
            max_tokens=request.max_tokens, temperature=0, stream=True, logit_bias=request.wire_bias(),
            stream_options={"include_usage": True})
        for chunk in stream:
            for choice in chunk.choices:
                watch.text(choice.delta.content)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return watch.done(tokens, "gateway chat (openai SDK)", request)

    def httpx_completion(self, request: Request, *, worker: bool) -> Sample:
        client = self.worker if worker else self.http
        assert client is not None
        body = {"model": self.model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0,
                "stream": True, "logit_bias": request.wire_bias(), "stream_options": {"include_usage": True}}
        watch, tokens = Stopwatch(), -1
        with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise BenchmarkError(f"{response.request.url} answered {response.status_code}: {response.read()!r}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    watch.text(choice.get("text"))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return watch.done(tokens, f"{'worker' if worker else 'gateway'} completion (httpx)", request)


@contextlib.contextmanager
def running_server(data_dir: Path, engine: EngineSettings, model: str) -> Iterator[tuple[ServerProcess, str]]:
    key = appliance("keys", "create", "--name", "bench", "--role", "admin",
                    data_dir=data_dir).stdout.strip().splitlines()[-1]
    env = {"APPLIANCE_MODELS__DEFAULT": model, "APPLIANCE_LLAMACPP__THREADS": str(engine.threads),
           "APPLIANCE_LLAMACPP__N_CTX": str(engine.n_ctx), "APPLIANCE_LLAMACPP__N_BATCH": str(engine.n_batch),
           "APPLIANCE_LLAMACPP__FLASH_ATTN": "true" if engine.flash_attn else "false",
           "APPLIANCE_LLAMACPP__N_GPU_LAYERS": str(engine.n_gpu_layers)}
    server = ServerProcess(data_dir, env)
    try:
        server.start(wait_ready=True)
        yield server, key
    finally:
        server.stop()


def worker_socket(data_dir: Path) -> Path | None:
    sockets = sorted(data_dir.rglob("*.sock"))
    return sockets[0] if len(sockets) == 1 else None


# ---------------------------------------------------------------- preparing the data dir


@contextlib.contextmanager
def prepared_data_dir(args: argparse.Namespace) -> Iterator[tuple[Path, str]]:
    """A scratch data dir holding the model: pulled through the real catalog path, imported, or copied."""
    tmp = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    data = tmp / "data"
    try:
        if args.data_dir:
            copy_data_dir(Path(args.data_dir).expanduser(), data)
            appliance("init", data_dir=data)  # brings a dir made by an older version up to date
            model = args.model_name or DEFAULT_MODEL
        else:
            appliance("init", data_dir=data)
            if args.model:
                appliance("models", "pull", f"file:{Path(args.model).expanduser().resolve()}", "--name",
                          BENCH_MODEL_NAME, data_dir=data)
                model = BENCH_MODEL_NAME
            else:
                print(f"pulling {DEFAULT_MODEL} with `appliance models pull` ...", file=sys.stderr, flush=True)
                appliance("models", "pull", DEFAULT_MODEL, data_dir=data)
                model = DEFAULT_MODEL
        yield data, model
    finally:
        if args.keep:
            print(f"kept the data dir {data}; reuse it with --data-dir {data}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def copy_data_dir(source: Path, target: Path) -> None:
    """Hard-link model blobs where the filesystem allows, copy the rest; the source is never changed."""
    if not (source / "models").is_dir():
        raise BenchmarkError(f"{source} is not a prepared data dir (it has no models/); run `appliance init` and "
                             "`appliance models pull` there, or leave out --data-dir")

    def copy(src: str, dst: str) -> object:
        if Path(src).parent.name == "models":
            with contextlib.suppress(OSError):
                os.link(src, dst)
                return dst
        return shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=copy, ignore=shutil.ignore_patterns("*.sock", "*.log"))


@contextlib.contextmanager
def model_file(data_dir: Path, model: str) -> Iterator[Path]:
    """The GGUF the server will load for `model`, opened through the appliance's own store."""
    from appliance.config import CryptoSettings
    from appliance.datadir import DataDir
    from appliance.registry.store import open_model_store

    data = DataDir(data_dir)
    conn = data.connect()
    try:
        row = conn.execute("SELECT sha256 FROM models WHERE name = ?", (model,)).fetchone()
    finally:
        conn.close()
    if row is None:
        raise BenchmarkError(f"model '{model}' is not in {data_dir}; pass --model-name or pull it there")
    with open_model_store(data, CryptoSettings()).open_for_load(row[0]) as weights:  # decrypted into a memfd
        yield weights.path


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> tuple[list[Summary], EngineSettings, str]:
    engine = engine_settings(args)
    with contextlib.ExitStack() as stack:
        data_dir, model = stack.enter_context(prepared_data_dir(args))
        direct = DirectLlama(stack.enter_context(model_file(data_dir, model)), engine)
        stack.callback(direct.close)
        banned = direct.end_of_generation_tokens()
        print("banning end-of-generation tokens " + ", ".join(f"{t} {direct.token_text(t)!r}" for t in banned),
              file=sys.stderr)
        server, key = stack.enter_context(running_server(data_dir, engine, model))
        clients = GatewayClients(server.url, key, worker_socket(data_dir), model)
        stack.callback(clients.close)
        workers = server.workers()
        assert server.proc is not None
        meter = CpuMeter({"client": psutil.Process(), "gateway": psutil.Process(server.proc.pid),
                          **({"worker": workers[0]} if len(workers) == 1 else {})})
        completion = [
            Contender("direct", direct.completion),
            Contender(HEADLINE, clients.sdk_completion, "direct"),
            Contender("gateway/httpx", lambda r: clients.httpx_completion(r, worker=False), "direct"),
        ]
        if clients.worker is not None:
            completion.append(Contender("worker/httpx", lambda r: clients.httpx_completion(r, worker=True),
                                        "direct"))
        phases = [completion]
        if not args.no_chat:
            phases.append([Contender("direct-chat", direct.chat),
                           Contender("gateway-chat/openai", clients.sdk_chat, "direct-chat")])
        for contenders in phases:
            measure(contenders, meter, args, banned)
            if not args.fresh_prompts:
                report_texts(contenders)
    return summarise([c for phase in phases for c in phase]), engine, model


def measure(contenders: list[Contender], meter: CpuMeter, args: argparse.Namespace, banned: tuple[int, ...]) -> None:
    """Interleave: each round runs every contender once, starting one further along the list each time."""
    for round_ in range(args.warmup + args.rounds):
        shift = round_ % len(contenders)
        this_round: dict[str, Sample] = {}
        for i, contender in enumerate(contenders[shift:] + contenders[:shift]):
            prompt = f"({round_}.{i}) {args.prompt}" if args.fresh_prompts else args.prompt
            request = Request(prompt, args.max_tokens, banned)
            this_round[contender.name] = meter.measure(lambda c=contender, r=request: c.run(r))  # type: ignore[misc]
        if round_ >= args.warmup:
            for contender in contenders:
                contender.samples.append(this_round[contender.name])
        label = "warm-up" if round_ < args.warmup else f"round {round_ - args.warmup + 1}/{args.rounds}"
        print(f"{label}: " + ", ".join(f"{c.name} {this_round[c.name].tokens_per_s:.1f} tok/s "
                                        f"{this_round[c.name].ttft * 1000:.0f} ms" for c in contenders),
              file=sys.stderr, flush=True)


def report_texts(contenders: list[Contender]) -> None:
    """Greedy decoding of one prompt should give one text; say where it did not."""
    texts = {c.name: {s.text for s in c.samples} for c in contenders}
    for name, variants in texts.items():
        if len(variants) > 1:
            print(f"note: {name} produced {len(variants)} different texts over the rounds", file=sys.stderr)
    groups: dict[str, list[str]] = {}
    for name, variants in texts.items():
        groups.setdefault(min(variants), []).append(name)
    if len(groups) > 1:
        print("note: the texts differ between contenders; groups with equal text: "
              + "; ".join(", ".join(names) for names in groups.values()), file=sys.stderr)


# ---------------------------------------------------------------- reporting


@dataclass
class Summary:
    name: str
    ttft_p50_ms: float
    ttft_p95_ms: float
    toks_p50: float
    decode_toks_p50: float
    cpu_p50: dict[str, float]
    toks_ratio: float | None = None
    ttft_overhead_ms: float | None = None


def summarise(contenders: list[Contender]) -> list[Summary]:
    by_name: dict[str, Summary] = {}
    for c in contenders:
        ttft = [s.ttft * 1000 for s in c.samples]
        cpu = {role: statistics.median(s.cpu.get(role, float("nan")) for s in c.samples) for role in ROLES}
        summary = Summary(c.name, statistics.median(ttft), percentile(ttft, 0.95),
                          statistics.median(s.tokens_per_s for s in c.samples),
                          statistics.median(s.decode_tokens_per_s for s in c.samples), cpu)
        if c.baseline is not None:
            base = by_name[c.baseline]
            summary.toks_ratio = summary.toks_p50 / base.toks_p50
            summary.ttft_overhead_ms = summary.ttft_p50_ms - base.ttft_p50_ms
        by_name[c.name] = summary
    return list(by_name.values())


def table(summaries: list[Summary]) -> str:
    rows = ["| contender | TTFT p50 ms | TTFT p95 ms | tok/s p50 | decode tok/s p50 | tok/s vs direct "
            "| TTFT overhead p50 ms | CPU s/req client | gateway | worker |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        ratio = f"{s.toks_ratio:.3f}x" if s.toks_ratio is not None else "baseline"
        overhead = f"{s.ttft_overhead_ms:+.1f}" if s.ttft_overhead_ms is not None else "-"
        cpu = " | ".join(f"{s.cpu_p50[role]:.2f}" for role in ROLES)
        rows.append(f"| {s.name} | {s.ttft_p50_ms:.1f} | {s.ttft_p95_ms:.1f} | {s.toks_p50:.1f} "
                    f"| {s.decode_toks_p50:.1f} | {ratio} | {overhead} | {cpu} |")
    return "\n".join(rows)


def machine_info(load_at_start: tuple[float, float, float]) -> dict[str, str]:
    import llama_cpp

    from appliance.config import physical_cores

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), Path("/proc/cpuinfo").open() as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"CPU": f"{cpu}, {physical_cores()} physical cores, {os.cpu_count()} logical",
            "load average (1/5/15 min)": " ".join(f"{x:.2f}" for x in load_at_start) + " at the start, "
                                         + " ".join(f"{x:.2f}" for x in os.getloadavg()) + " at the end",
            "versions": f"python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__}, "
                        f"openai {openai.__version__}, httpx {httpx.__version__}"}


def print_report(summaries: list[Summary], engine: EngineSettings, args: argparse.Namespace, model: str,
                 load_at_start: tuple[float, float, float]) -> None:
    print("\n## Gateway vs llama-cpp-python used directly\n")
    for key, value in machine_info(load_at_start).items():
        print(f"- {key}: {value}")
    if load_at_start[0] > BUSY_LOAD:
        print(f"- WARNING: the machine was busy before the run started (load {load_at_start[0]:.2f}); other work "
              "competes with llama.cpp's threads and skews the ratios, so measure again on a quiet machine")
    print(f"- model {model}: threads={engine.threads} n_ctx={engine.n_ctx} n_batch={engine.n_batch} "
          f"flash_attn={engine.flash_attn} n_gpu_layers={engine.n_gpu_layers}")
    print(f"- greedy, streamed, exactly {args.max_tokens} completion tokens (EOG banned), {args.rounds} interleaved "
          f"rounds after {args.warmup} warm-up, "
          + ("a fresh prompt per request (TTFT includes prompt processing)" if args.fresh_prompts
             else "one prompt per phase (prompt KV cache reused on both sides)"))
    print("- tok/s = completion tokens / whole streamed response; decode tok/s = tokens after the first / time "
          "from first to last text chunk; CPU = seconds per request in each process (p50)")
    print()
    print(table(summaries))
    print()
    ratio, overhead = headline(summaries)
    print(f"tokens/s ratio ({HEADLINE} / direct): {ratio:.3f}x (target >= {TARGET_TOKS_RATIO}x) "
          f"{'OK' if ratio >= TARGET_TOKS_RATIO else 'MISSED'}")
    print(f"TTFT overhead p50 ({HEADLINE} - direct): {overhead:+.1f} ms (target <= {TARGET_TTFT_OVERHEAD_MS:.0f} ms) "
          f"{'OK' if overhead <= TARGET_TTFT_OVERHEAD_MS else 'MISSED'}")


def headline(summaries: list[Summary]) -> tuple[float, float]:
    summary = next(s for s in summaries if s.name == HEADLINE)
    assert summary.toks_ratio is not None and summary.ttft_overhead_ms is not None
    return summary.toks_ratio, summary.ttft_overhead_ms


def targets_met(summaries: list[Summary]) -> bool:
    ratio, overhead = headline(summaries)
    return ratio >= TARGET_TOKS_RATIO and overhead <= TARGET_TTFT_OVERHEAD_MS


# ---------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-dir", help="a prepared data dir holding the model (copied, never changed)")
    source.add_argument("--model", help="a GGUF file to import instead of pulling the default model")
    parser.add_argument("--model-name", help=f"the model's name inside --data-dir (default {DEFAULT_MODEL})")
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="discarded rounds before them (default 2)")
    parser.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request (default 128)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--fresh-prompts", action="store_true",
                        help="a distinct prompt per request, so TTFT includes processing the whole prompt")
    parser.add_argument("--threads", type=int, default=0, help="0 = physical cores, as the appliance does")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--no-flash-attn", action="store_true")
    parser.add_argument("--no-chat", action="store_true", help="skip the chat phase")
    parser.add_argument("--keep", action="store_true", help="keep the scratch data dir and print its path")
    parser.add_argument("--enforce", action="store_true",
                        help=f"exit 1 unless {HEADLINE} reaches {TARGET_TOKS_RATIO}x the direct tokens/s and its "
                             f"TTFT overhead p50 is at most {TARGET_TTFT_OVERHEAD_MS:.0f} ms")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.max_tokens < 2:
        parser.error("--rounds must be >= 1, --warmup >= 0 and --max-tokens >= 2")
    return args


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    from appliance.config import physical_cores
    from appliance.engines.llamacpp import gpu_offload_supported

    return EngineSettings(threads=args.threads or physical_cores(), n_ctx=args.n_ctx, n_batch=args.n_batch,
                          flash_attn=not args.no_flash_attn, n_gpu_layers=-1 if gpu_offload_supported() else 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    try:
        summaries, engine, model = run(args)
    except (BenchmarkError, AssertionError) as exc:  # AssertionError: tests.server's way of saying the CLI failed
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    print_report(summaries, engine, args, model, load_at_start)
    return 1 if args.enforce and not targets_met(summaries) else 0


if __name__ == "__main__":
    raise SystemExit(main())
