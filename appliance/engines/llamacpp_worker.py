"""The llama.cpp worker process: OpenAI-compatible HTTP on a Unix socket handed over by the supervisor.

Run as `python -m appliance.engines.llamacpp_worker --fd N --model PATH ...`. It dies with its parent
(PR_SET_PDEATHSIG), decodes up to --parallel sequences per step (llamacpp_scheduler), and stops a
request's generation when its client goes away."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from appliance.engines.chat_template import ChatTemplateError
from appliance.engines.llamacpp_runtime import ContextLengthExceeded, LlamaRuntime, Piece, Usage
from appliance.engines.llamacpp_sampling import InvalidSampling, response_schema, sampling_from
from appliance.engines.llamacpp_scheduler import Job, Outbox, Scheduler
from appliance.engines.tool_calls import CallDelta, ToolCallParser, ToolRequestError, ToolSet, tool_style

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PR_SET_PDEATHSIG = 1
_encoder = msgspec.json.Encoder()


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
              with_usage_field: bool = False) -> bytes:
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
                elif not delta and piece.finish_reason is None:
                    return b""  # the calls' syntax between their names and arguments: nothing to send
            obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                               "finish_reason": self.finish_reason(piece.finish_reason)}]
        else:
            obj["choices"] = [{"index": 0, "text": piece.text, "logprobs": None,
                               "finish_reason": piece.finish_reason}]
        if usage is not None:
            obj["usage"] = _usage(usage)
        elif with_usage_field:
            obj["usage"] = None
        return b"data: " + _encoder.encode(obj) + b"\n\n"

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's "tool_calls" when the model stopped after writing calls."""
        if reason == "stop" and self.calls is not None and self.calls.calls:
            return "tool_calls"
        return reason

    def whole(self, text: str, finish_reason: str, usage: Usage, tool_text: str = "") -> bytes:
        if self.calls is not None and tool_text:
            self.calls.feed(tool_text)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": self.finish_reason(finish_reason)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            if self.calls is not None and self.calls.calls:
                choice["message"] = {"role": "assistant", "content": text or None, "tool_calls": self.calls.result()}
        else:
            choice["text"] = text
        return _encoder.encode({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                                "system_fingerprint": None, "choices": [choice], "usage": _usage(usage)})


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
    def __init__(self, runtime: LlamaRuntime, model_name: str, stream_interval: float = 0.0) -> None:
        self.runtime = runtime
        self.model_name = model_name
        self.busy = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.scheduler = Scheduler(runtime, self._deliver, stream_interval)
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
                "busy": self.busy, **self.scheduler.stats()}

    async def completion(self, receive: Receive, send: Send, *, chat: bool) -> None:
        body = msgspec.json.decode(await _read_body(receive))
        what = "messages" if chat else "prompt"
        try:
            tools = ToolSet.from_body(body) if chat else None
            prompt = self.runtime.chat_prompt(body["messages"], tools) if chat else body["prompt"]
            tokens = self.runtime.tokenize(prompt, is_chat=chat)
            params = sampling_from(body)
            plan = tools.plan(tool_style(self.runtime.template), response_schema(body)) if tools else None
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
        queue: asyncio.Queue[Piece | BaseException] = asyncio.Queue()
        job = Job(tokens, params, queue.put_nowait, limit, plan)  # emit is called on this loop by _dispatch

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.scheduler.cancel(job)

        watcher = asyncio.create_task(watch_disconnect())
        self.busy += 1
        self.scheduler.submit(job)
        try:
            first = await queue.get()  # before any header: a request refused by the scheduler gets its own status
            if isinstance(first, InvalidSampling):
                await _respond(send, 400, error_body(str(first), "invalid_request_error", "invalid_value",
                                                     first.param))
                return
            fmt = CompletionFormat(chat, body.get("model") or self.model_name, plan is not None)
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                await self._stream(send, fmt, first, queue, job.usage, include_usage)
            else:
                text, finish, tool_text = await _collect(first, queue)
                if finish != "cancelled":
                    await _respond(send, 200, fmt.whole(text, finish, job.usage, tool_text))
        finally:
            self.scheduler.cancel(job)
            watcher.cancel()
            self.busy -= 1

    async def _stream(self, send: Send, fmt: CompletionFormat, item: Piece | BaseException,
                      queue: asyncio.Queue[Piece | BaseException], usage: Usage, include_usage: bool) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        first = True
        while True:
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason == "cancelled":
                break
            chunk = fmt.chunk(item, first=first, with_usage_field=include_usage)
            if chunk:
                await _send_chunk(send, chunk)
                first = False
            if item.finish_reason is not None:
                if include_usage:
                    await _send_chunk(send, fmt.chunk(None, usage=usage))
                await _send_chunk(send, b"data: [DONE]\n\n")
                break
            item = await queue.get()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _dispatch(items: Outbox) -> None:
    for job, item in items:
        job.emit(item)


async def _collect(item: Piece | BaseException, queue: asyncio.Queue[Piece | BaseException]
                   ) -> tuple[str, str, str]:
    """(content, finish reason, tool-call text) of a whole request."""
    parts: list[str] = []
    tool_parts: list[str] = []
    while True:
        if isinstance(item, BaseException):
            raise item
        parts.append(item.text)
        tool_parts.append(item.tool_text)
        if item.finish_reason:
            return "".join(parts), item.finish_reason, "".join(tool_parts)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="listening Unix socket inherited from the supervisor")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--model", required=True, help="path of the GGUF file")
    parser.add_argument("--name", required=True, help="model name reported in responses")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, default=0)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--flash-attn", action="store_true")
    parser.add_argument("--parallel", type=int, default=1, help="sequences decoded together (continuous batching)")
    parser.add_argument("--stream-interval-ms", type=float, default=0.0,
                        help="hand a stream's text over at most this often (0 = every token)")
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
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

    app = WorkerApp(runtime, args.name, args.stream_interval_ms / 1000)
    config = uvicorn.Config(app, fd=args.fd, lifespan="off", access_log=False,
                            log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
