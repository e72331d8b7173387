"""`WatermarkService`: which models' workers watermark their output (`[watermark]` settings), the key and
parameters each such worker gets, and the detection behind `POST /api/watermark/detect`.

Detection tokenizes the text with the model's own tokenizer, through its worker's `/tokenize` (loading the model if
it is not loaded), and scores it with that model's key (`appliance.watermark.green`). It works for a model whether or
not its watermark is on now (a text written while it was on stays detectable); only engines that watermark
(llama.cpp) can be asked. Changing gamma, or losing the wrapped secret, hides texts written before."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from appliance.config import WatermarkSettings
from appliance.errors import InvalidRequest
from appliance.registry.service import ModelRecord
from appliance.watermark.green import GreenList, score
from appliance.watermark.keys import WatermarkKeys

EXAMPLE = '{"model": "smollm2-135m-instruct", "text": "..."}'
MAX_TEXT_CHARS = 200_000
WATERMARK_FORMATS = frozenset({"gguf", "hf"})  # llama.cpp's sampler, vLLM's logits processor; not remote upstreams
_FIELD = re.compile(r"`\$\.(\w+)`|field `(\w+)`")  # msgspec: "... at `$.text`", "... unknown field `x`"

Resolve = Callable[[str, Any], ModelRecord]
"""The record of the version that serves a model name or alias for a principal (404 if unknown or not allowed)."""
Tokenize = Callable[[str, str], Awaitable[list[int]]]
"""The tokens of a text (no BOS) by the model version `ref`'s tokenizer."""


class DetectBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str
    text: str


class WatermarkUnsupported(InvalidRequest):
    code = "watermark_unsupported"


class WatermarkService:
    def __init__(self, settings: WatermarkSettings, keys: WatermarkKeys) -> None:
        self.settings = settings
        self.keys = keys

    def enabled_for(self, model: str) -> bool:
        return self.settings.enabled or model in self.settings.models

    def worker_config(self, record: ModelRecord) -> bytes | None:
        """What a llama.cpp worker serving `record` reads from its watermark descriptor, or None for no watermark.
        Holds the model's key: it goes to the worker only through an inherited sealed memfd."""
        if not self.enabled_for(record.name) or record.format not in WATERMARK_FORMATS:
            return None
        return msgspec.json.encode({"key": self.keys.model_key(record.name).hex(), "gamma": self.settings.gamma,
                                    "delta": self.settings.delta})

    async def detect(self, raw: bytes, principal: Any, resolve: Resolve, tokenize: Tokenize) -> dict[str, Any]:
        body = _decode(raw)
        record = resolve(body.model, principal)
        if record.format not in WATERMARK_FORMATS:
            raise WatermarkUnsupported(f"model '{body.model}' is served by a remote upstream, whose output the "
                                       "appliance does not watermark (its llama.cpp and vLLM models it does); its "
                                       "texts cannot be tested", param="model")
        tokens = await tokenize(body.model, body.text)
        result = score(tokens, GreenList(self.keys.model_key(record.name), 0, self.settings.gamma))
        return {"object": "watermark.detection", "model": body.model,
                "watermarked": result.watermarked(self.settings.z_threshold), "z_score": round(result.z_score, 4),
                "tokens_scored": result.scored, "green_tokens": result.green,
                "z_threshold": self.settings.z_threshold, "watermark_enabled": self.enabled_for(record.name)}


def _decode(raw: bytes) -> DetectBody:
    try:
        body = msgspec.json.decode(raw, type=DetectBody)
    except msgspec.ValidationError as exc:
        found = _FIELD.search(str(exc))
        raise InvalidRequest(f"{exc}; send e.g. {EXAMPLE}", param=found.group(1) or found.group(2) if found else None,
                             code="invalid_body") from None
    except msgspec.DecodeError:
        raise InvalidRequest(f"the body is not JSON; send e.g. {EXAMPLE}", code="invalid_body") from None
    if not body.model:
        raise InvalidRequest("model is empty; name the model that may have written the text", param="model",
                             code="invalid_value")
    if not body.text.strip():
        raise InvalidRequest("text is empty; send the text to test for the model's watermark", param="text",
                             code="empty_text")
    if len(body.text) > MAX_TEXT_CHARS:
        raise InvalidRequest(f"text has {len(body.text)} characters; at most {MAX_TEXT_CHARS} are tested at once: "
                             "send a part of it", param="text", code="text_too_long")
    return body
