"""The llama.cpp worker process: OpenAI-compatible HTTP on a Unix socket handed over by the supervisor.

Run as `python -m appliance.engines.llamacpp_worker --fd N --model PATH ...`. It dies with its parent
(PR_SET_PDEATHSIG), decodes up to --parallel sequences per step (llamacpp_scheduler), and stops a
request's generation when its client goes away."""

from __future__ import annotations

import argparse
import asyncio
import copy
import ctypes
import dataclasses
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from appliance.engines.chat_template import ChatTemplateError
from appliance.engines.llamacpp_logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from appliance.engines.llamacpp_runtime import ContextLengthExceeded, LlamaRuntime, Piece, Usage
from appliance.engines.llamacpp_sampling import InvalidSampling, SamplingParams, response_schema, sampling_from
from appliance.engines.llamacpp_scheduler import Job, Outbox, Scheduler
from appliance.engines.tool_calls import CallDelta, ToolCallParser, ToolPlan, ToolRequestError, ToolSet
from appliance.watermark.green import GreenList, Watermark

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PR_SET_PDEATHSIG = 1
# automatic prompt lookup: on where a drafted token costs less than this fraction of a one-token step. A quoting
# answer keeps ~45% of drafted tokens (SmolLM2-135M, RAG prompt): at a cost of 0.3 a draft of 8 gains, at 0.7 (a
# CPU with Q4_1 weights, whose kernels do one dot product per token) it loses.
DRAFT_COST_MAX = 0.3
MAX_N = 128  # choices per request, as OpenAI; beyond the worker's free sequences they queue
_encoder = msgspec.json.Encoder()
Indexed = tuple[int, Piece | BaseException]  # a choice's index and its next item


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies, then close the race where it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return _encoder.encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


class CompletionFormat:
    """OpenAI response shapes for /v1/chat/completions and /v1/completions."""

    def __init__(self, chat: bool, model: str, tools: bool = False) -> None:
        self.chat = chat
        self.model = model
        self.calls = ToolCallParser() if tools else None
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def chunk(self, piece: Piece | None, *, first: bool = False, usage: Usage | None = None,
              with_usage_field: bool = False, index: int = 0, offset: int = 0) -> bytes:
        """One SSE event: `piece` of choice `index` (`offset`: characters of that choice already sent, for the
        legacy logprobs' text_offset), or the usage alone."""
        obj: dict[str, Any] = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""),
                               "created": self.created, "model": self.model, "system_fingerprint": None}
        if piece is None:
            obj["choices"] = []
        elif self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if piece.text:
                delta["content"] = piece.text
            if piece.tool_text and self.calls is not None:
                deltas = [_call_delta(d) for d in self.calls.feed(piece.tool_text)]
                if deltas:
                    delta["tool_calls"] = deltas
                elif not delta and piece.finish_reason is None and not piece.logprobs:
                    return b""  # the calls' syntax between their names and arguments: nothing to send
            obj["choices"] = [{"index": index, "delta": delta, "logprobs": self.logprobs(piece.logprobs, offset),
                               "finish_reason": self.finish_reason(piece.finish_reason)}]
        else:
            obj["choices"] = [{"index": index, "text": piece.text, "logprobs": self.logprobs(piece.logprobs, offset),
                               "finish_reason": piece.finish_reason}]
        if usage is not None:
            obj["usage"] = _usage(usage)
        elif with_usage_field:
            obj["usage"] = None
        return b"data: " + _encoder.encode(obj) + b"\n\n"

    def logprobs(self, entries: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
        if entries is None:
            return None
        return chat_logprobs(entries) if self.chat else completion_logprobs(entries, offset)

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's "tool_calls" when the model stopped after writing calls."""
        if reason == "stop" and self.calls is not None and self.calls.calls:
            return "tool_calls"
        return reason

    def for_choice(self) -> CompletionFormat:
        """The same response (id, created) for another choice of an n > 1 request: its own tool-call parser."""
        other = copy.copy(self)
        other.calls = ToolCallParser() if self.calls is not None else None
        return other

    def whole(self, text: str, finish_reason: str, usage: Usage, tool_text: str = "", *,
              logprobs: list[TokenLogprob] | None = None) -> bytes:
        return self.body([self.choice(text, finish_reason, tool_text, logprobs=logprobs)], usage)

    def body(self, choices: list[dict[str, Any]], usage: Usage) -> bytes:
        """The whole response with these choices (from `choice`, n of them for an n > 1 request)."""
        return _encoder.encode({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                                "system_fingerprint": None, "choices": choices, "usage": _usage(usage)})

    def choice(self, text: str, finish_reason: str, tool_text: str = "", *, index: int = 0,
               logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        if self.calls is not None and tool_text:
            self.calls.feed(tool_text)
        choice: dict[str, Any] = {"index": index, "logprobs": self.logprobs(logprobs),
                                  "finish_reason": self.finish_reason(finish_reason)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            if self.calls is not None and self.calls.calls:
                choice["message"] = {"role": "assistant", "content": text or None, "tool_calls": self.calls.result()}
        else:
            choice["text"] = text
        return choice


def _call_delta(delta: CallDelta) -> dict[str, Any]:
    """A streamed tool-call delta in OpenAI's shape: the id and name first, then argument fragments."""
    if delta.id is not None:
        return {"index": delta.index, "id": delta.id, "type": "function",
                "function": {"name": delta.name, "arguments": delta.arguments}}
    return {"index": delta.index, "function": {"arguments": delta.arguments}}


def _usage(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage; `cached_tokens` counts the prompt tokens whose KV cache a slot still held (prefix reuse)."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


class WorkerApp:
    def __init__(self, runtime: LlamaRuntime, model_name: str, stream_interval: float = 0.0,
                 lookup_draft: int = 0, watermark: Watermark | None = None) -> None:
        self.runtime = runtime
        self.model_name = model_name
        self.busy = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.watermarked = watermark is not None
        self.scheduler = Scheduler(runtime, self._deliver, stream_interval, lookup_draft, watermark)
        self.scheduler.start()

    def _deliver(self, items: Outbox) -> None:
        """On the scheduler's thread: one wake-up of the event loop for everything a step produced."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(_dispatch, items)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/health" and method == "GET":
            await _respond(send, 200, _encoder.encode(self.health()))
        elif path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
            await self.completion(receive, send, chat=path == "/v1/chat/completions")
        elif path == "/tokenize" and method == "POST":
            await _respond(send, 200, _encoder.encode(self.tokenize(msgspec.json.decode(await _read_body(receive)))))
        else:
            await _respond(send, 404, error_body(f"no route {method} {path}", "invalid_request_error", "not_found"))

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's /tokenize: the tokens of a prompt (or of chat messages in the template) and the context per
        sequence; the gateway fits RAG passages with it."""
        if "messages" in body:
            prompt = self.runtime.chat_prompt(body["messages"], ToolSet.from_body(body))
            tokens = self.runtime.tokenize(prompt, is_chat=True)
        else:
            text = str(body.get("prompt", "")).encode("utf-8")
            tokens = self.runtime.model.tokenize(text, add_bos=bool(body.get("add_special_tokens", True)),
                                                 special=False)
        return {"count": len(tokens), "max_model_len": self.runtime.n_ctx, "tokens": tokens}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "pid": os.getpid(), "n_ctx": self.runtime.n_ctx,
                "busy": self.busy, "watermarked": self.watermarked, **self.scheduler.stats()}

    async def completion(self, receive: Receive, send: Send, *, chat: bool) -> None:
        body = msgspec.json.decode(await _read_body(receive))
        what = "messages" if chat else "prompt"
        try:
            tools = ToolSet.from_body(body) if chat else None
            prompt = self.runtime.chat_prompt(body["messages"], tools) if chat else body["prompt"]
            tokens = self.runtime.tokenize(prompt, is_chat=chat)
            params = sampling_from(body)
            n = choices_of(body)
            plan = tools.plan(self.runtime.tool_traits.style, response_schema(body)) if tools else None
            if plan is not None and plan.upfront is not None:
                params.grammar = plan.upfront
            limit = self.runtime.check_context(len(tokens), params.max_tokens, what)
        except ContextLengthExceeded as exc:
            await _respond(send, 400, error_body(str(exc), "invalid_request_error", "context_length_exceeded", what))
            return
        except ChatTemplateError as exc:
            await _respond(send, 422, error_body(str(exc), "invalid_request_error", "chat_template_error"))
            return
        except (InvalidSampling, ToolRequestError) as exc:
            await _respond(send, 400, error_body(str(exc), "invalid_request_error", "invalid_value", exc.param))
            return
        self.loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Indexed] = asyncio.Queue()
        jobs = choice_jobs(tokens, params, limit, n, queue, plan)  # their emits are called on this loop by _dispatch

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            for job in jobs:
                self.scheduler.cancel(job)

        watcher = asyncio.create_task(watch_disconnect())
        self.busy += 1
        self.scheduler.submit(*jobs)
        try:
            first = await queue.get()  # before any header: a request refused by the scheduler gets its own status
            if isinstance(first[1], InvalidSampling):
                await _respond(send, 400, error_body(str(first[1]), "invalid_request_error", "invalid_value",
                                                     first[1].param))
                return
            fmt = CompletionFormat(chat, body.get("model") or self.model_name, plan is not None)
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                await self._stream(send, fmt, first, queue, jobs, include_usage)
            else:
                choices = await _collect(first, queue, n)
                if all(finish != "cancelled" for _, finish, _, _ in choices):
                    await _respond(send, 200, fmt.body([
                        (fmt if i == 0 else fmt.for_choice()).choice(text, finish, tool_text, index=i, logprobs=lp)
                        for i, (text, finish, tool_text, lp) in enumerate(choices)], total_usage(jobs)))
        finally:
            for job in jobs:
                self.scheduler.cancel(job)
            watcher.cancel()
            self.busy -= 1

    async def _stream(self, send: Send, fmt: CompletionFormat, item: Indexed, queue: asyncio.Queue[Indexed],
                      jobs: list[Job], include_usage: bool) -> None:
        """The choices' pieces as they come, each chunk naming its choice; the usage and [DONE] after the last
        choice finished."""
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        formats = [fmt, *(fmt.for_choice() for _ in jobs[1:])]  # a tool-call parser per choice
        started = [False] * len(jobs)
        offsets = [0] * len(jobs)  # characters sent per choice (the legacy logprobs' text_offset)
        running = len(jobs)
        while True:
            index, piece = item
            if isinstance(piece, BaseException):
                raise piece
            if piece.finish_reason == "cancelled":
                break
            chunk = formats[index].chunk(piece, first=not started[index], with_usage_field=include_usage,
                                         index=index, offset=offsets[index])
            if chunk:
                await _send_chunk(send, chunk)
                started[index] = True
            offsets[index] += len(piece.text)
            if piece.finish_reason is not None:
                running -= 1
                if not running:
                    if include_usage:
                        await _send_chunk(send, fmt.chunk(None, usage=total_usage(jobs)))
                    await _send_chunk(send, b"data: [DONE]\n\n")
                    break
            item = await queue.get()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def choices_of(body: dict[str, Any]) -> int:
    """The request's `n`: how many choices to generate for its prompt."""
    n = body.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise InvalidSampling(f"n must be an integer from 1 to {MAX_N}", "n")
    return n


def choice_jobs(tokens: list[int], params: SamplingParams, limit: int, n: int, queue: asyncio.Queue[Indexed],
                tools: ToolPlan | None = None) -> list[Job]:
    """One job per choice; the first leads (the others copy its prompt's KV cache). With a seed, choice i samples
    with seed + i: the choices differ, and the same request gives the same choices again."""
    def emit_to(index: int) -> Callable[[Piece | BaseException], None]:
        return lambda item: queue.put_nowait((index, item))

    leader = Job(tokens, params, emit_to(0), limit, tools)
    return [leader, *(Job(tokens, params if params.seed is None else dataclasses.replace(params, seed=params.seed + i),
                          emit_to(i), limit, tools, leader=leader) for i in range(1, n))]


def total_usage(jobs: list[Job]) -> Usage:
    """The request's usage: the prompt once, the completion tokens of every choice (as OpenAI counts n > 1)."""
    return Usage(jobs[0].usage.prompt_tokens, sum(job.usage.completion_tokens for job in jobs),
                 jobs[0].usage.cached_tokens)


def _dispatch(items: Outbox) -> None:
    for job, item in items:
        job.emit(item)


async def _collect(item: Indexed, queue: asyncio.Queue[Indexed], n: int
                   ) -> list[tuple[str, str, str, list[TokenLogprob] | None]]:
    """Each choice's content, finish reason, tool-call text and logprob entries (None when not asked for); a
    cancelled choice ends the collection (the client is gone)."""
    parts: list[list[str]] = [[] for _ in range(n)]
    tool_parts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob] | None] = [None] * n
    finish: list[str] = [""] * n
    running = n
    while True:
        index, piece = item
        if isinstance(piece, BaseException):
            raise piece
        parts[index].append(piece.text)
        tool_parts[index].append(piece.tool_text)
        if piece.logprobs is not None:
            logprobs[index] = (logprobs[index] or []) + piece.logprobs
        if piece.finish_reason:
            finish[index] = piece.finish_reason
            running -= 1
            if not running or piece.finish_reason == "cancelled":
                return [("".join(p), f or "cancelled", "".join(tp), lp)
                        for p, f, tp, lp in zip(parts, finish, tool_parts, logprobs, strict=True)]
        item = await queue.get()


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_chunk(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def lookup_draft(runtime: LlamaRuntime, mode: str, most: int, offloaded: bool) -> int:
    """The draft length the scheduler uses: `most`, unless prompt lookup is off, or automatic where a drafted token
    costs nearly what a step does (DRAFT_COST_MAX), where it would lose more steps than it saves. Automatic is off
    without GPU offload: CPU kernels compute each token apart (0.54-0.63 of a step for the default model on a
    2-core box), and a measurement taken while something else loads (the gateway's embedding model, or another
    server) can come out low, which once turned drafts on and cost a single stream a third of its speed."""
    if mode == "off" or most <= 0 or (mode == "auto" and not offloaded):
        return 0
    if mode == "on":
        return most
    cost = runtime.draft_cost()
    on = cost < DRAFT_COST_MAX
    print(f"prompt lookup {'on' if on else 'off'}: a drafted token costs {cost:.2f} of a step "
          f"(on below {DRAFT_COST_MAX})", file=sys.stderr, flush=True)
    return most if on else 0


def read_watermark_config(fd: int) -> tuple[bytes, float, float]:
    """The watermark's key, gamma and delta from the descriptor the supervisor passed (a sealed memfd holding
    `{"key": hex, "gamma", "delta"}`; the key never goes through argv or the environment). Closes it."""
    try:
        config = msgspec.json.decode(os.pread(fd, 1 << 16, 0))
    finally:
        os.close(fd)
    return bytes.fromhex(config["key"]), float(config["gamma"]), float(config["delta"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="listening Unix socket inherited from the supervisor")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--model", required=True, help="path of the GGUF file")
    parser.add_argument("--name", required=True, help="model name reported in responses")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, default=0)
    parser.add_argument("--n-batch", type=int, default=2048)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--flash-attn", action="store_true")
    parser.add_argument("--parallel", type=int, default=1, help="sequences decoded together (continuous batching)")
    parser.add_argument("--stream-interval-ms", type=float, default=0.0,
                        help="hand a stream's text over at most this often (0 = every token)")
    parser.add_argument("--lookup-draft", type=int, default=0,
                        help="most prompt-lookup draft tokens per step for a request decoding alone (0 = off)")
    parser.add_argument("--lookup", choices=("auto", "on", "off"), default="auto",
                        help="prompt lookup: auto = on where verifying a draft costs little (measured at load)")
    parser.add_argument("--watermark-fd", type=int, default=-1,
                        help="inherited descriptor to read the watermark's key and parameters from (JSON); none = "
                             "no watermark")
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    watermark_config = read_watermark_config(args.watermark_fd) if args.watermark_fd >= 0 else None
    started = time.monotonic()
    print(f"loading {args.name} from {args.model}", file=sys.stderr, flush=True)
    runtime = LlamaRuntime(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_batch=args.n_batch,
                           n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn, parallel=args.parallel)
    print(f"loaded {args.name} in {time.monotonic() - started:.2f}s, n_ctx={runtime.n_ctx} x {runtime.parallel} "
          "sequences", file=sys.stderr, flush=True)
    if runtime.template.is_fallback:
        print(f"{args.name} carries no chat template; chat requests use ChatML, which may not be the format it "
              "was trained on (use /v1/completions or a GGUF with a template)", file=sys.stderr, flush=True)
    import uvicorn

    draft = lookup_draft(runtime, args.lookup, args.lookup_draft, offloaded=args.n_gpu_layers != 0)
    watermark = None
    if watermark_config is not None:
        key, gamma, delta = watermark_config
        watermark = Watermark(GreenList(key, runtime.n_vocab, gamma), delta)
    app = WorkerApp(runtime, args.name, args.stream_interval_ms / 1000, draft, watermark)
    config = uvicorn.Config(app, fd=args.fd, lifespan="off", access_log=False,
                            log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
