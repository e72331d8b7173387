"""What a cached response is filed under: the partition (whose it is), the model version and the canonical request.

The key hashes the model's blob sha256 (a re-pulled model is a new version: new keys), the request with everything
that cannot change the answer left out (`user`, `stream`, `stream_options`, the model's name or alias, the `cache`
directive) and absent fields dropped, the partition, and the versions of the RAG collections the request used.
The key text starts with the partition and the model version so that both can be dropped by prefix."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from typing import Any, Literal

import msgspec

KEY_VERSION = 1
Directive = Literal["store", "no-store"]
# Fields that do not change what the model answers: left out of the key.
_NOT_IN_KEY = frozenset({"model", "user", "stream", "stream_options", "cache", "n"})
_encoder = msgspec.json.Encoder(order="sorted")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def partition_of(principal: Any, shared_roles: Collection[str] = ()) -> str:
    """Whose cache a request reads and fills: its role's shared group when the settings name the role, else the
    user (a session, or a key a user made for themselves), else the key."""
    if principal is None:
        return "anonymous"
    role = str(getattr(principal, "role", ""))
    if role in shared_roles and _GROUP_NAME.match(role):
        return f"role:{role}"
    user_id = getattr(principal, "user_id", None) or getattr(principal, "owner_user_id", None)
    if user_id:
        return f"user:{user_id}"
    return f"key:{principal.key_id}"


def directive_of(body_value: str | None, headers: Mapping[str, str]) -> Directive | None:
    """The client's choice: the body's `cache` field, `x-cache: store|no-store` or `Cache-Control: no-store`.
    A no-store anywhere wins; None when the client said nothing."""
    said = {body_value, headers.get("x-cache", "").strip().lower() or None}
    control = {part.strip().lower() for part in headers.get("cache-control", "").split(",")}
    if "no-store" in said or "no-store" in control:
        return "no-store"
    return "store" if "store" in said else None


def is_deterministic(body: Mapping[str, Any]) -> bool:
    """Greedy decoding (temperature 0) or a fixed seed: the same request gives the same answer."""
    return body.get("temperature") == 0 or body.get("seed") is not None


def canonical_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The upstream body without what cannot change the answer, and without absent (null) fields."""
    return {k: v for k, v in body.items() if k not in _NOT_IN_KEY and v is not None}


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text a semantic match compares: the last user message of a chat, or a completion's prompt."""
    if "prompt" in body:
        return str(body["prompt"])
    users = [m.get("content") or "" for m in body.get("messages", ()) if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def request_texts(body: Mapping[str, Any]) -> list[str]:
    """Every text the client sent (for the privacy check)."""
    if "prompt" in body:
        return [str(body["prompt"])]
    return [str(m.get("content") or "") for m in body.get("messages", ())]


def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(_encoder.encode(payload)).hexdigest()


def cache_key(model_sha256: str, body: Mapping[str, Any], partition: str, *, chat: bool,
              rag_versions: Mapping[str, int] | None = None, policy: str = "") -> str:
    """The exact-cache key: `<partition>/<model sha256>/<digest of the canonical request>`. `policy` names the
    privacy policy in force (its digest): answers were screened by the output surface before they were stored, so a
    changed policy must not be served what the old one let through."""
    payload = {"v": KEY_VERSION, "kind": "chat" if chat else "completion", "request": canonical_request(body),
               "rag": sorted(rag_versions.items()) if rag_versions else None, "partition": partition,
               "model": model_sha256, "policy": policy}
    return f"{partition}/{model_sha256}/{_digest(payload)}"


def context_key(model_sha256: str, body: Mapping[str, Any], partition: str, *, chat: bool,
                rag_versions: Mapping[str, int] | None = None, policy: str = "") -> str:
    """What must be equal for a semantic hit: the exact key's inputs without the prompt text it compares
    (`prompt_text`), so that only the wording of the question may differ."""
    request = canonical_request(body)
    if chat:
        messages = list(request.get("messages", ()))
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last_user is not None:
            messages[last_user] = {**messages[last_user], "content": None}
        request["messages"] = messages
    else:
        request["prompt"] = None
    return cache_key(model_sha256, request, partition, chat=chat, rag_versions=rag_versions, policy=policy)


def key_partition(key: str) -> str:
    return key.split("/", 1)[0]


def key_model(key: str) -> str:
    return key.split("/", 2)[1]
