"""The completion path: model lookup, quota, queue, worker, streaming with metrics. No HTTP framework in here.

`CompletionService.run` is the one orchestrating function of DESIGN section 2; later steps (policy, cache, RAG)
slot in between validation and routing.

A key limited to some models (`appliance keys create --models`) asking for another gets the very answer an unknown
model gets (404 model_not_found), so that it learns nothing about what is installed; the refusal is audited
(`model.use`, denied), which is rare enough not to flood the log.

Quotas (step 5): the request's tokens are estimated (`appliance.auth.quotas.estimate_tokens`) and reserved before
it queues, on every subject the principal spends (a user's own key: the key and its owner; all or none); afterwards
each reservation is settled with the worker's usage. A request for n choices is n completions of one prompt: it
reserves the prompt once and n x max_tokens, and its usage counts every choice's tokens. Which usage, by outcome:
* completed (whole or streamed): the worker's `usage` (prompt_tokens + completion_tokens);
* refused before generating (a worker 4xx such as context_length_exceeded, a full queue, a model that cannot load,
  a worker that died before answering): released, the request and its tokens are given back;
* a stream that ends without its usage chunk (client disconnect, worker death mid-stream): the prompt estimate
  plus one token per text chunk relayed, which is what the client saw (the worker streams about one token a chunk;
  a disconnect cancels generation at once, so little more was generated);
* a whole request whose client went away mid-generation: the reservation stands, since the worker may have
  generated up to max_tokens and its usage never arrives.

Usage history (step 9, `appliance.usage`): once settled, a request that was charged is counted for its user, key and
model with the worker's prompt and completion tokens; a stream cut short counts the prompt estimate and a token per
chunk relayed, as its quota does; a cached answer counts as a request with no tokens; a request released (nothing
generated) is not counted."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from appliance.audit import AuditLog
from appliance.auth.keys import Principal
from appliance.auth.quotas import QuotaService, Reservation, estimate_prompt_tokens, estimate_tokens, merge_status
from appliance.auth.sessions import SessionPrincipal
from appliance.cache.keys import Directive
from appliance.cache.service import NO_CACHE, ResponseCacheService
from appliance.errors import ApplianceError, InvalidRequest, WorkerFailed
from appliance.feedback.ledger import ResponseLedger, response_id
from appliance.gateway.schemas import ChatCompletionRequest, CompletionRequest, Message, upstream_body
from appliance.logs import get_logger
from appliance.observability.genai import WorkerCall, operation_name, response_attributes
from appliance.observability.metrics import Metrics
from appliance.observability.tracing import Tracing, ended, record_error
from appliance.privacy.gateway import GatewayPrivacy
from appliance.rag.chat import RagChat
from appliance.registry.rollout import RolloutService
from appliance.registry.service import ModelRegistry, model_not_found
from appliance.supervisor.pool import WorkerPool
from appliance.supervisor.process import Worker
from appliance.usage import UsageLog

log = get_logger(__name__)
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
READY = b""
_JSON = {"content-type": "application/json"}
# An OpenAI chunk with generated text, and the one with a usage object (JSON as vLLM and our worker write it).
_TEXT = re.compile(rb'"(?:content|text|arguments)":\s*"(?!")')
_USAGE = re.compile(rb'"usage":\s*\{')
_FINISH = re.compile(rb'"finish_reason":\s*"([a-z_]{1,32})"')  # looked for only while tracing
SERVED_HEADER = "x-served-model"  # the version that answered, `name@N` (DESIGN section 2, step 9)


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
    """A whole (non-streamed) response body, already OpenAI-shaped, and the key's rate-limit headers."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Streamed:
    """Server-sent events, and the key's rate-limit headers as they stood when the stream began."""

    events: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Metered:
    """A request's quota reservations (one per subject it spends), and what its response has shown: the usage, or
    how many text chunks."""

    reservations: list[Reservation] = field(default_factory=list)
    prompt_estimate: int = 0
    usage_tokens: int | None = None
    text_chunks: int = 0
    usage: dict[str, int] | None = None  # the worker's usage object, when it sent one
    model: str = ""
    principal: Principal | SessionPrincipal | None = None
    tools: list[str] = field(default_factory=list)  # the functions the model called (names only, for the audit)
    requested: str = ""  # the model as the client named it (a name or an alias), for the GenAI metrics
    first_token_at: float = 0.0  # perf_counter() when the first generated text went out
    served: str = ""  # the version that answered (`name@N`): the `x-served-model` header, usage and audit

    @property
    def charged(self) -> bool:
        """Whether the response showed anything to charge (else its reservations are released)."""
        return self.usage_tokens is not None or self.text_chunks > 0

    def token_counts(self) -> tuple[int, int]:
        """(prompt, completion) tokens for the usage history (see the module docstring)."""
        if self.usage is not None:
            return int(self.usage.get("prompt_tokens", 0)), int(self.usage.get("completion_tokens", 0))
        if self.usage_tokens is None:
            return self.prompt_estimate, self.text_chunks
        return 0, 0

    @property
    def reserved_tokens(self) -> int:
        return self.reservations[0].tokens if self.reservations else 0

    def headers(self) -> dict[str, str]:
        """`x-ratelimit-*` for the tightest of the limits spent."""
        return merge_status(r.status for r in self.reservations).headers() if self.reservations else {}


def sse_error(error: ApplianceError) -> bytes:
    return b"data: " + _encoder.encode(error.to_body()) + b"\n\n"


class CompletionService:
    def __init__(self, registry: ModelRegistry, pool: WorkerPool, metrics: Metrics,
                 quotas: QuotaService | None = None, audit: AuditLog | None = None,
                 cache: ResponseCacheService | None = None) -> None:
        self.registry = registry
        self.pool = pool
        self.metrics = metrics
        self.quotas = quotas
        self.audit = audit
        self.privacy: GatewayPrivacy | None = None  # the prompt and output surfaces, set by the app
        self.cache = cache
        self.rag_chat: RagChat | None = None  # set by the composition root when RAG is on
        self.rollout: RolloutService | None = None  # aliases, versions and canaries; set by the composition root
        self.usage: UsageLog | None = None  # the usage history; set by the composition root
        self.ledger: ResponseLedger | None = None  # who got which response from which version (feedback)
        self.tracing = Tracing()  # spans of the steps (off unless the composition root passes one that is on)

    async def run(self, request: ChatCompletionRequest | CompletionRequest, route: str,
                  principal: Principal | SessionPrincipal | None = None, cache: Directive | None = None
                  ) -> Completed | Streamed:
        """One completion; a chat that names RAG collections is grounded in them first (step 7, before the cache
        so that the cache key holds the passages retrieved) and answered with its citations."""
        if not isinstance(request, ChatCompletionRequest) or request.rag is None:
            return await self._complete(request, route, principal, cache)
        if self.rag_chat is None:
            raise InvalidRequest("RAG is not available on this server", param="rag", code="rag_unavailable")
        self.check_model(request.model, principal)
        messages = upstream_body(request)["messages"]
        with self.tracing.step("rag.retrieval", {"gen_ai.operation.name": "retrieval",
                                                 "gen_ai.request.top_k": float(request.rag.top_k)}):
            grounded, grounding = await self.rag_chat.ground(
                messages, request.rag, request.model, request.max_completion_tokens or request.max_tokens, principal)
        request = msgspec.structs.replace(
            request, rag=None, messages=[Message(role=m["role"], content=m["content"]) for m in grounded])
        result = await self._complete(request, route, principal, cache)
        if isinstance(result, Completed):
            result.body = grounding.add_to_body(result.body)
            return result
        return Streamed(grounding.add_to_stream(result.events, request.model), result.headers)

    async def _complete(self, request: ChatCompletionRequest | CompletionRequest, route: str,
                        principal: Principal | SessionPrincipal | None = None, cache: Directive | None = None
                        ) -> Completed | Streamed:
        """One completion for `principal` (None: no quota applies), whole or as a stream of SSE events; `cache` is
        the client's cache directive (see appliance.cache.service)."""
        self.check_model(request.model, principal)
        # step 8's routing: alias or name -> one version (a canary split sticks to the principal); the worker is
        # that version's, while the response keeps the name the client asked for
        key = request.model if self.rollout is None else self.rollout.route(request.model, principal).ref
        record = self.registry.get(key)  # 404 before queueing for an unknown model
        chat = isinstance(request, ChatCompletionRequest)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = upstream_body(request)
        if self.privacy is not None:  # step 4: PII in the prompt is blocked (422) or rewritten
            with self.tracing.step("privacy"):
                self.privacy.screen_request(body)
        with self.tracing.step("quota"):
            metered = self._reserve(request, body, principal)  # 429 before queueing when over a quota
        metered.model, metered.principal, metered.requested, metered.served = record.name, principal, request.model, key
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        lookup = NO_CACHE
        if self.cache is not None:
            with self.tracing.step("cache.lookup") as span:
                lookup = await self.cache.lookup(body, chat=chat, model_sha256=record.sha256, principal=principal,
                                                 directive=cache)
                if span is not None:
                    span.set_attribute("appliance.cache.hit", lookup.entry is not None)
            if lookup.records:  # a cached answer says which version produced it (NO_CACHE is shared: untouched)
                lookup.served = key
        if lookup.entry is not None:  # a hit: a request, no tokens (see appliance.cache.service)
            metered.usage_tokens = 0
            metered.served = lookup.entry.served or key
            self._settle(metered)
            headers = {**metered.headers(), **lookup.headers, SERVED_HEADER: metered.served}
            if request.stream:
                return Streamed(self._noted(lookup.stream(request.model, include_usage), metered), headers)
            whole = lookup.whole(request.model)
            self._note(whole, metered)
            return Completed(whole, headers)
        if not request.stream:
            completed = await self._whole(record.name, path, body, metered, key)
            lookup.store_whole(completed.body)
            completed.headers.update(lookup.headers)
            completed.headers[SERVED_HEADER] = key
            self._note(completed.body, metered)
            return completed
        events = self._stream(record.name, path, body, include_usage or lookup.records, metered, key)
        first = await events.__anext__()  # errors before the first byte become HTTP errors, not SSE events
        assert first is READY
        if lookup.records:
            events = lookup.recorded(events, include_usage)
        return Streamed(self._noted(events, metered), {**metered.headers(), **lookup.headers, SERVED_HEADER: key})

    def _note(self, body: bytes, metered: Metered) -> None:
        """Remember who got this response and which version served it, so that they may rate it (off the hot
        path: the ledger writes in batches)."""
        if self.ledger is not None and metered.principal is not None:
            self.ledger.note(response_id(body), metered.principal, metered.served)

    async def _noted(self, events: AsyncIterator[bytes], metered: Metered) -> AsyncIterator[bytes]:
        """The stream, its response id noted from the first chunk that has one; closing this closes `events`
        (which settles the quotas at once on a client disconnect)."""
        pending = self.ledger is not None and metered.principal is not None
        try:
            async for data in events:
                if pending and b'"id"' in data:
                    pending = False
                    self._note(data, metered)
                yield data
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()

    def check_model(self, model: str, principal: Principal | SessionPrincipal | None) -> None:
        """Refuse a model outside the key's allowed models exactly as an unknown one, and audit the refusal."""
        allowed = principal.models if principal is not None else None
        if allowed is None or model in allowed:
            return
        assert principal is not None
        if self.audit is not None:
            try:
                self.audit.record(principal.subject, "model.use", model[:80], "denied",
                                  reason="not among the key's allowed models")
            except (sqlite3.Error, ValueError) as exc:  # e.g. a model name shaped like a key: refuse all the same
                log.warning("audit.record_failed", action="model.use", error=str(exc))
        raise model_not_found(model)

    def _reserve(self, request: ChatCompletionRequest | CompletionRequest, body: dict[str, Any],
                 principal: Principal | SessionPrincipal | None) -> Metered:
        if self.quotas is None or principal is None or all(limits.unlimited for _, limits in principal.quotas):
            return Metered()
        if isinstance(request, ChatCompletionRequest):
            texts = [m["content"] for m in body["messages"]]
            texts += [c["function"]["arguments"] for m in body["messages"] for c in m.get("tool_calls") or ()]
            if body.get("tools"):
                texts.append(_encoder.encode(body["tools"]).decode())
            prompt = estimate_prompt_tokens(texts, len(body["messages"]))
        else:
            prompt = estimate_prompt_tokens([body["prompt"]], 0)
        tokens = prompt + int(body.get("n") or 1) * estimate_tokens(0, body.get("max_tokens"))  # n completions
        return Metered(self.quotas.reserve_all(principal.quotas, tokens), prompt)

    def _settle(self, metered: Metered) -> None:
        """Charge what the response showed (see the module docstring) and count it in the usage history; release
        when it showed nothing."""
        if self.usage is not None and metered.charged:
            self.usage.record(metered.principal, metered.model, *metered.token_counts(), served=metered.served)
        if metered.tools and self.audit is not None:  # which functions a model called, never their arguments
            try:
                self.audit.record(str(getattr(metered.principal, "subject", "") or "anonymous"), "chat.tool_calls",
                                  metered.model, "ok", tools=sorted(set(metered.tools))[:32], calls=len(metered.tools),
                                  served=metered.served)
            except (sqlite3.Error, ValueError) as exc:
                log.warning("audit.record_failed", action="chat.tool_calls", error=str(exc))
        if self.quotas is None:
            return
        for reservation in metered.reservations:
            if metered.usage_tokens is not None:
                self.quotas.settle(reservation, metered.usage_tokens)
            elif metered.text_chunks:
                self.quotas.settle(reservation, metered.prompt_estimate + metered.text_chunks)
            else:
                self.quotas.release(reservation)

    async def _whole(self, model: str, path: str, body: dict[str, Any], metered: Metered, key: str = ""
                     ) -> Completed:
        try:
            completed, usage = await self._whole_unmetered(model, path, body, key, metered.requested)
        except ApplianceError:  # refused, or failed before a usage came back: nothing to charge
            self._settle(metered)
            raise
        metered.usage = usage
        metered.usage_tokens = _total(usage) if usage is not None else metered.reserved_tokens  # none: the estimate
        if b'"tool_calls"' in completed.body:
            metered.tools = [c["function"]["name"] for choice in _decoder.decode(completed.body).get("choices") or ()
                             for c in (choice.get("message") or {}).get("tool_calls") or ()]
        self._settle(metered)
        if metered.reservations:
            completed.headers = metered.headers()
        return completed

    async def _whole_unmetered(self, model: str, path: str, body: dict[str, Any], key: str = "",
                               requested: str = "") -> tuple[Completed, dict[str, int] | None]:
        """`model` labels the metrics; `key` names the worker (a version, `name@N`), else `model` does; `requested`:
        the model as the client named it (the GenAI metrics' request model)."""
        started = time.perf_counter()
        async with contextlib.AsyncExitStack() as stack:
            worker = await self._acquire(stack, key or model, body)
            call = WorkerCall(operation_name(path), _engine(worker), requested or model, key or model)
            error = ""
            try:
                with ended(self.tracing.start(call.span_name, attributes=call.request_attributes(body),
                                              client=True)) as span:
                    try:
                        response = await worker.client.post(path, content=_encoder.encode(body),
                                                            headers=_propagate(span, _JSON))
                    except httpx.TransportError as exc:
                        raise WorkerFailed(_worker_failure(model, exc, worker)) from exc
                    if response.status_code != 200:
                        raise UpstreamError(response.status_code, response.content)
                    decoded = _decoder.decode(response.content)
                    if span is not None:
                        span.set_attributes(response_attributes(decoded.get("usage"), _finish_reasons(decoded), None))
            except ApplianceError as exc:
                error = type(exc).__name__
                raise
            finally:
                self.metrics.genai.observe(call, started, time.perf_counter(), None, 0, error)
        usage = decoded.get("usage")
        self._count_tokens(model, usage or {})
        self.metrics.ttft.labels(model).observe(time.perf_counter() - started)
        content = response.content if self.privacy is None else self.privacy.screen_response(response.content)
        return Completed(content), usage or None

    async def _acquire(self, stack: contextlib.AsyncExitStack, name: str, body: dict[str, Any]) -> Worker:
        """Step 8's queue: wait for a slot of the worker (loading it if need be), held until `stack` closes; a
        `queue.wait` span while tracing."""
        with ended(self.tracing.start("queue.wait")):
            return await stack.enter_async_context(self.pool.acquire(name, keep_alive=body.pop("keep_alive", None)))

    async def _stream(self, model: str, path: str, body: dict[str, Any], include_usage: bool, metered: Metered,
                      key: str = "") -> AsyncIterator[bytes]:
        started = time.perf_counter()
        call, error = None, ""
        finish: list[str] | None = [] if self.tracing.enabled else None  # finish reasons, looked for when tracing
        try:
            async with contextlib.AsyncExitStack() as stack:
                worker = await self._acquire(stack, key or model, body)
                call = WorkerCall(operation_name(path), _engine(worker), metered.requested or model, key or model)
                # the first step of this generator runs in the request's context: the span's parent is the request's
                span = stack.enter_context(ended(self.tracing.start(
                    call.span_name, attributes=call.request_attributes(body), client=True)))
                issued = time.perf_counter()
                try:
                    async with worker.client.stream("POST", path, content=_encoder.encode(body),
                                                    headers=_propagate(span, _JSON)) as response:
                        if response.status_code != 200:
                            raise UpstreamError(response.status_code, await response.aread())
                        yield READY
                        relayed = self._relay(model, response, include_usage, started, metered, finish)
                        if self.privacy is not None:  # the output surface, entities split across chunks included
                            relayed = self.privacy.screen_stream(relayed, sse_error)
                        async for event in relayed:
                            yield event
                except httpx.TransportError as exc:
                    failure = WorkerFailed(_worker_failure(model, exc, worker))
                    log.warning("stream.failed", model=model, error=str(exc) or type(exc).__name__)
                    error = type(failure).__name__
                    if span is not None:
                        record_error(span, failure)
                    yield sse_error(failure)
                finally:
                    if span is not None:
                        span.set_attributes(response_attributes(
                            metered.usage, finish or [], metered.first_token_at - issued if metered.first_token_at
                            else None))
        except ApplianceError as exc:
            error = type(exc).__name__
            raise
        except GeneratorExit:  # the client went away
            error = "cancelled"
            raise
        finally:  # also on a client disconnect, which closes this generator
            if call is not None:
                self.metrics.genai.observe(call, started, time.perf_counter(), metered.first_token_at or None,
                                           _output_tokens(metered), error)
            self._settle(metered)

    async def _relay(self, model: str, response: httpx.Response, include_usage: bool, started: float,
                     metered: Metered, finish: list[str] | None = None) -> AsyncIterator[bytes]:
        """Pass the worker's events through as bytes, one write per read; look inside only with cheap patterns:
        this loop runs once per token and its CPU comes out of generation on a small box. `finish` (while tracing)
        collects the finish reasons."""
        ttft, gap = self.metrics.ttft.labels(model), self.metrics.inter_token.labels(model)
        last = 0.0
        pending = b""
        async for data in response.aiter_raw():
            *events, pending = (pending + data).split(b"\n\n")
            out = []
            for event in events:
                if not event.startswith(b"data: "):
                    continue
                if _USAGE.search(event):
                    chunk = _decoder.decode(event[6:])
                    self._count_tokens(model, chunk["usage"])
                    metered.usage, metered.usage_tokens = chunk["usage"], _total(chunk["usage"])
                    if not chunk.get("choices") and not include_usage:
                        continue
                if b'"tool_calls"' in event:
                    metered.tools += _called(event)
                if _TEXT.search(event):
                    metered.text_chunks += 1
                    now = time.perf_counter()
                    if last:
                        gap.observe(now - last)
                    else:
                        ttft.observe(now - started)
                        metered.first_token_at = now
                    last = now
                if finish is not None and (found := _FINISH.search(event)):
                    finish.append(found.group(1).decode())
                out.append(event + b"\n\n")
            if out:
                yield b"".join(out)

    def _count_tokens(self, model: str, usage: dict[str, int]) -> None:
        self.metrics.prompt_tokens.labels(model).inc(usage.get("prompt_tokens", 0))
        self.metrics.completion_tokens.labels(model).inc(usage.get("completion_tokens", 0))


def _called(event: bytes) -> list[str]:
    """The function names that start tool calls in one streamed chunk."""
    try:
        chunk = _decoder.decode(event[6:])
    except msgspec.DecodeError:
        return []
    return [call["function"]["name"] for choice in chunk.get("choices") or ()
            for call in (choice.get("delta") or {}).get("tool_calls") or ()
            if (call.get("function") or {}).get("name")]


def _engine(worker: Worker) -> str:
    """`gen_ai.provider.name`: the engine behind a worker (llama.cpp, vllm, remote)."""
    return str(getattr(worker, "engine", "unknown"))


def _propagate(span: Any, headers: dict[str, str]) -> dict[str, str]:
    """The worker call's headers, with the W3C traceparent of its CLIENT span while tracing."""
    if span is None:
        return headers
    from opentelemetry.propagate import inject
    from opentelemetry.trace import set_span_in_context

    carrier = dict(headers)
    inject(carrier, context=set_span_in_context(span))
    return carrier


def _finish_reasons(body: dict[str, Any]) -> list[str]:
    return [str(c["finish_reason"]) for c in body.get("choices") or () if c.get("finish_reason")]


def _output_tokens(metered: Metered) -> int:
    if metered.usage is not None:
        return int(metered.usage.get("completion_tokens", 0))
    return metered.text_chunks


def _total(usage: dict[str, int]) -> int:
    return int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))


def _worker_failure(model: str, exc: Exception, worker: Worker) -> str:
    if _engine(worker) == "remote":  # a pool fails over before the first byte; this one had started
        return (f"the upstream serving '{model}' failed during the request ({type(exc).__name__}); retry the "
                "request (another upstream takes it if this one is out)")
    return (f"the worker serving '{model}' failed during the request ({type(exc).__name__}); it is being "
            "restarted, retry the request")
