"""OpenAI-compatible routes: thin handlers that decode, call the completion service and shape the reply."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.response import Stream

from appliance.auth.guards import permission
from appliance.cache.keys import directive_of
from appliance.gateway.embeddings import EmbeddingsEndpoint
from appliance.gateway.schemas import ChatCompletionRequest, CompletionRequest, decode_request
from appliance.gateway.service import Completed, CompletionService
from appliance.registry.service import ModelRegistry

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _complete(request: Request[Any, Any, State], service: CompletionService,
                    kind: type[ChatCompletionRequest | CompletionRequest]) -> Response[bytes] | Stream:
    body: ChatCompletionRequest | CompletionRequest = decode_request(await request.body(), kind)
    request.scope["state"]["model"] = body.model
    result = await service.run(body, request.url.path, principal=request.user,
                               cache=directive_of(body.cache, request.headers))
    if isinstance(result, Completed):
        return Response(result.body, media_type="application/json", headers=result.headers)
    return Stream(result.events, media_type="text/event-stream", headers={**SSE_HEADERS, **result.headers})


class OpenAIController(Controller):
    path = "/v1"
    tags = ("OpenAI-compatible",)

    @get("/models", summary="List the installed models (for a key limited to some models, only those)",
         opt=permission("models:read"))
    async def list_models(self, request: Request[Any, Any, State], models: NamedDependency[ModelRegistry]
                          ) -> dict[str, Any]:
        allowed: frozenset[str] | None = getattr(request.user, "models", None)
        installed = models.list()
        names = {m.name for m in installed}
        aliases = [{"id": a.alias, "object": "model", "created": _epoch(a.updated_at), "owned_by": "appliance",
                    "alias_of": models.versions.worker_key(a.alias)}  # the stable version, canaries aside
                   for a in models.versions.aliases() if a.alias not in names]
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": _epoch(m.created_at), "owned_by": "appliance"}
            for m in installed if allowed is None or m.name in allowed
        ] + [a for a in aliases if allowed is None or a["id"] in allowed]}

    @post("/chat/completions", summary="Create a chat completion", status_code=200, opt=permission("chat:use"))
    async def chat_completions(self, request: Request[Any, Any, State], completions: NamedDependency[CompletionService]
                               ) -> Response[bytes] | Stream:
        return await _complete(request, completions, ChatCompletionRequest)

    @post("/embeddings", summary="Create embeddings", status_code=200, opt=permission("embeddings:use"))
    async def create_embeddings(self, request: Request[Any, Any, State],
                                embeddings: NamedDependency[EmbeddingsEndpoint]) -> dict[str, Any]:
        return await embeddings.create(await request.body(), request.user)

    @post("/completions", summary="Create a text completion", status_code=200, opt=permission("chat:use"))
    async def completions(self, request: Request[Any, Any, State], completions: NamedDependency[CompletionService]
                          ) -> Response[bytes] | Stream:
        return await _complete(request, completions, CompletionRequest)


def _epoch(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp())
