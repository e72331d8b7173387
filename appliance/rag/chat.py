"""Chat with RAG (DESIGN section 2, step 7): a chat request that names collections is answered from them.

The last user message is the query; the passages found are numbered and put in a system message that asks the
model to answer from them and cite them as [n], as many as fit in the model's context budget (a share of its
context, less the conversation and the room kept for the answer), counted with the model's own tokenizer through
the worker's `/tokenize` (vLLM's shape; our llama.cpp worker serves the same). The response carries `citations`:
in the body of a whole response, and as the final chunk of a stream before `[DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from appliance.auth.guards import effective_permissions
from appliance.auth.rbac import Rbac
from appliance.errors import Forbidden, InvalidRequest
from appliance.gateway.schemas import RagRequest
from appliance.logs import get_logger
from appliance.rag.service import RagService, Result
from appliance.supervisor.pool import WorkerPool
from appliance.supervisor.process import worker_tokenize

log = get_logger(__name__)
SYSTEM = ("Answer the user's question using only the numbered sources below, and cite the sources you use like "
          "[1]. If the sources do not contain the answer, say that you do not know.")
SNIPPET_CHARS = 300
_DONE = b"data: [DONE]"


@dataclass(frozen=True)
class Grounding:
    """What retrieval added to a request: the citations to return with the answer."""

    citations: list[dict[str, Any]]

    def add_to_body(self, body: bytes) -> bytes:
        data = msgspec.json.decode(body)
        data["citations"] = self.citations
        return msgspec.json.encode(data)

    async def add_to_stream(self, events: AsyncIterator[bytes], model: str) -> AsyncIterator[bytes]:
        chunk = msgspec.json.encode({"object": "chat.completion.chunk", "model": model, "choices": [],
                                     "citations": self.citations})
        sent = False
        async for data in events:
            if not sent and _DONE in data:
                head, _, tail = data.partition(_DONE)
                yield head + b"data: " + chunk + b"\n\n" + _DONE + tail
                sent = True
            else:
                yield data
        if not sent:  # a stream that ended early (an error event): the citations still arrive
            yield b"data: " + chunk + b"\n\n"


class RagChat:
    def __init__(self, rag: RagService, pool: WorkerPool, rbac: Rbac) -> None:
        self.rag = rag
        self.pool = pool
        self.rbac = rbac

    async def ground(self, messages: list[dict[str, Any]], options: RagRequest, model: str, max_tokens: int | None,
                     principal: Any) -> tuple[list[dict[str, Any]], Grounding]:
        """`messages` with the retrieved sources in a system message, and the citations."""
        self._check_permission(principal)
        if not options.collections:
            raise InvalidRequest("rag.collections is empty; name at least one collection", param="rag.collections",
                                 code="invalid_value")
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user" and m["content"]), "")
        if not query:
            raise InvalidRequest("a chat with rag needs a user message to search for", param="messages",
                                 code="invalid_value")
        results = await self.rag.query(principal, options.collections, query, options.top_k, options.mode,
                                       per_document=max(options.top_k, 1))
        budget = await self._budget(model, messages, max_tokens)
        picked = await self._fit(model, results, budget)
        sources = "\n\n".join(f"[{i}] {_source(r)}" for i, r in enumerate(picked, start=1))
        system = f"{SYSTEM}\n\nSources:\n\n{sources}" if picked else (
            "No sources were found for this question in the collections searched; say so.")
        rest = [m for m in messages if m["role"] not in ("system", "developer")]
        own = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer") and m["content"])
        grounded = [{"role": "system", "content": f"{own}\n\n{system}" if own else system}, *rest]
        citations = [{"index": i, "document_id": r.chunk.document_id, "chunk_id": r.chunk.chunk_id,
                      "collection": r.collection, "snippet": r.chunk.text[:SNIPPET_CHARS], "score": round(r.score, 6)}
                     for i, r in enumerate(picked, start=1)]
        return grounded, Grounding(citations)

    def _check_permission(self, principal: Any) -> None:
        if principal is not None and "rag:read" in effective_permissions(principal, self.rbac):
            return
        raise Forbidden("a chat with 'rag' needs the permission 'rag:read', which this caller lacks",
                        code="insufficient_permissions")

    async def _budget(self, model: str, messages: Sequence[dict[str, Any]], max_tokens: int | None) -> int:
        context, used = await self._context_and_count(model, "\n".join(str(m["content"]) for m in messages))
        share = self.rag.settings.context_share
        room = context - used - (max_tokens or 256) - 64  # the template's own tokens and the instructions
        return max(0, min(int(context * share), room))

    async def _fit(self, model: str, results: Sequence[Result], budget: int) -> list[Result]:
        picked: list[Result] = []
        used = 0
        for result in results:
            _, cost = await self._context_and_count(model, f"[{len(picked) + 1}] {_source(result)}\n\n")
            if used + cost > budget:
                continue  # a shorter passage further down may still fit
            picked.append(result)
            used += cost
        return picked

    async def _context_and_count(self, model: str, text: str) -> tuple[int, int]:
        """The model's context per sequence and the tokens of `text`, from the worker's /tokenize."""
        worker = await self.pool.ensure_loaded(model)
        data = await worker_tokenize(worker.client, model, text, "for RAG")
        return int(data["max_model_len"]), int(data["count"])


def _source(result: Result) -> str:
    where = f"{result.chunk.document_id}" + (f", {result.chunk.heading}" if result.chunk.heading else "")
    return f"({where})\n{result.chunk.text}"
