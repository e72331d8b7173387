"""`POST /v1/embeddings` as OpenAI defines it: a string or a list (of strings or token arrays), float or base64
output, usage; the caller's quota is charged the word-pieces read."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import msgspec

from appliance.auth.quotas import QuotaService
from appliance.errors import InvalidRequest
from appliance.gateway.schemas import decode_json
from appliance.observability.tracing import Tracing
from appliance.rag.embeddings import EmbeddingService, check_inputs
from appliance.registry.service import model_not_found

MAX_INPUTS = 2048


class EmbeddingRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[str | int | list[int]]  # strings, or token arrays: checked in `_texts`
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None


class EmbeddingsEndpoint:
    def __init__(self, embeddings: EmbeddingService, quotas: QuotaService | None = None) -> None:
        self.embeddings = embeddings
        self.quotas = quotas
        self.tracing = Tracing()  # off unless the composition root passes its own

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.embeddings.name,)

    async def create(self, body: bytes, principal: Any) -> dict[str, Any]:
        request = decode_json(body, EmbeddingRequest)
        if request.model not in self.model_names:
            raise model_not_found(request.model)
        allowed = getattr(principal, "models", None)
        if allowed is not None and request.model not in allowed:
            raise model_not_found(request.model)
        texts = await self._texts(request.input)
        check_inputs(texts, MAX_INPUTS)
        model = self.embeddings.model
        if request.dimensions is not None and request.dimensions != await self.embeddings.run(lambda: model.dimensions):
            raise InvalidRequest(f"model '{request.model}' makes vectors of {model.dimensions} dimensions and cannot "
                                 "shorten them; leave out 'dimensions'", param="dimensions", code="unsupported_value")
        reservations = []
        if self.quotas is not None and principal is not None and not all(q.unlimited for _, q in principal.quotas):
            estimate = sum(len(t) for t in texts) // 3 + 2 * len(texts)
            reservations = self.quotas.reserve_all(principal.quotas, estimate)
        try:
            # in-process, so INTERNAL (semantic conventions v1.41.1, Embeddings); the inputs are never attributes
            with self.tracing.step(f"embeddings {request.model}", {
                    "gen_ai.operation.name": "embeddings", "gen_ai.provider.name": "sentence-transformers",
                    "gen_ai.request.model": request.model, "gen_ai.response.model": request.model}) as span:
                embedded = await self.embeddings.embed(texts)
                if span is not None:
                    span.set_attribute("gen_ai.usage.input_tokens", embedded.tokens)
                    span.set_attribute("gen_ai.embeddings.dimension.count", int(embedded.vectors.shape[1]))
        except BaseException:
            for reservation in reservations:
                self.quotas.release(reservation)  # type: ignore[union-attr]
            raise
        for reservation in reservations:
            self.quotas.settle(reservation, embedded.tokens)  # type: ignore[union-attr]
        data = [{"object": "embedding", "index": i, "embedding": _encode(row.tolist(), row.tobytes(),
                                                                           request.encoding_format)}
                for i, row in enumerate(embedded.vectors)]
        return {"object": "list", "data": data, "model": request.model,
                "usage": {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens}}

    async def _texts(self, value: str | list[str | int | list[int]]) -> list[str]:
        if isinstance(value, str):
            return [value]
        if all(isinstance(v, str) for v in value):
            return [str(v) for v in value]
        if all(isinstance(v, int) for v in value):
            arrays: list[list[int]] = [[int(v) for v in value]]  # type: ignore[arg-type]
        elif all(isinstance(v, list) for v in value):
            arrays = [list(v) for v in value]  # type: ignore[arg-type]
        else:
            raise InvalidRequest("'input' must be a string, a list of strings, a token array or a list of token "
                                 "arrays", param="input", code="invalid_value")
        tokenizer = await self.embeddings.run(lambda: self.embeddings.model.model.tokenizer)
        vocab = tokenizer.vocab_size
        for i, ids in enumerate(arrays):
            if not ids or any(not 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"input[{i}] has token ids outside this model's vocabulary (0..{vocab - 1})",
                                     param=f"input[{i}]", code="invalid_value")
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in arrays]


def _encode(values: list[float], raw: bytes, encoding: str) -> list[float] | str:
    return base64.b64encode(raw).decode() if encoding == "base64" else values
