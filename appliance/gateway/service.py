"""The completion path: model lookup, queue, worker, streaming with metrics. No HTTP framework in here.

`CompletionService.run` is the one orchestrating function of DESIGN section 2; later steps (policy, quotas,
cache, RAG) slot in between validation and routing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from appliance.errors import ApplianceError, WorkerFailed
from appliance.gateway.schemas import ChatCompletionRequest, CompletionRequest, upstream_body
from appliance.logs import get_logger
from appliance.observability.metrics import Metrics
from appliance.registry.service import ModelRegistry
from appliance.supervisor.pool import WorkerPool

log = get_logger(__name__)
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
READY = b""


class UpstreamError(ApplianceError):
    """A worker refused the request (4xx): its OpenAI-shaped body is passed on unchanged."""

    def __init__(self, status_code: int, body: bytes) -> None:
        try:
            message = _decoder.decode(body)["error"]["message"]
        except (msgspec.DecodeError, KeyError, TypeError):
            message = body.decode("utf-8", errors="replace")[:500]
        super().__init__(message)
        self.status_code = status_code
        self.body = body


@dataclass
class Completed:
    """A whole (non-streamed) response body, already OpenAI-shaped."""

    body: bytes


def sse_error(error: ApplianceError) -> bytes:
    return b"data: " + _encoder.encode(error.to_body()) + b"\n\n"


class CompletionService:
    def __init__(self, registry: ModelRegistry, pool: WorkerPool, metrics: Metrics) -> None:
        self.registry = registry
        self.pool = pool
        self.metrics = metrics

    async def run(self, request: ChatCompletionRequest | CompletionRequest, route: str
                  ) -> Completed | AsyncIterator[bytes]:
        self.registry.get(request.model)  # 404 before queueing for an unknown model
        path = "/v1/chat/completions" if isinstance(request, ChatCompletionRequest) else "/v1/completions"
        body = upstream_body(request)
        if not request.stream:
            return await self._whole(request.model, path, body)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = self._stream(request.model, path, body, include_usage)
        first = await events.__anext__()  # errors before the first byte become HTTP errors, not SSE events
        assert first is READY
        return events

    async def _whole(self, model: str, path: str, body: dict[str, Any]) -> Completed:
        started = time.perf_counter()
        async with self.pool.acquire(model) as worker:
            try:
                response = await worker.client.post(path, content=_encoder.encode(body),
                                                    headers={"content-type": "application/json"})
            except httpx.TransportError as exc:
                raise WorkerFailed(_worker_failure(model, exc)) from exc
        if response.status_code != 200:
            raise UpstreamError(response.status_code, response.content)
        usage = _decoder.decode(response.content).get("usage") or {}
        self._count_tokens(model, usage)
        self.metrics.ttft.labels(model).observe(time.perf_counter() - started)
        return Completed(response.content)

    async def _stream(self, model: str, path: str, body: dict[str, Any], include_usage: bool
                      ) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        async with self.pool.acquire(model) as worker:
            try:
                async with worker.client.stream("POST", path, content=_encoder.encode(body),
                                                headers={"content-type": "application/json"}) as response:
                    if response.status_code != 200:
                        raise UpstreamError(response.status_code, await response.aread())
                    yield READY
                    async for event in self._relay(model, response, include_usage, started):
                        yield event
            except httpx.TransportError as exc:
                error = WorkerFailed(_worker_failure(model, exc))
                log.warning("stream.failed", model=model, error=str(exc) or type(exc).__name__)
                yield sse_error(error)

    async def _relay(self, model: str, response: httpx.Response, include_usage: bool, started: float
                     ) -> AsyncIterator[bytes]:
        last = 0.0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload != "[DONE]":
                chunk = _decoder.decode(payload)
                if chunk.get("usage"):
                    self._count_tokens(model, chunk["usage"])
                    if not chunk.get("choices") and not include_usage:
                        continue
                if _has_text(chunk):
                    now = time.perf_counter()
                    if last:
                        self.metrics.inter_token.labels(model).observe(now - last)
                    else:
                        self.metrics.ttft.labels(model).observe(now - started)
                    last = now
            yield (line + "\n\n").encode()

    def _count_tokens(self, model: str, usage: dict[str, int]) -> None:
        self.metrics.prompt_tokens.labels(model).inc(usage.get("prompt_tokens", 0))
        self.metrics.completion_tokens.labels(model).inc(usage.get("completion_tokens", 0))


def _has_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


def _worker_failure(model: str, exc: Exception) -> str:
    return (f"the worker serving '{model}' failed during the request ({type(exc).__name__}); it is being "
            "restarted, retry the request")
