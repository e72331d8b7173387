"""`ResponsesService`: a Responses API request through the chat-completions path, and the stored responses.

A request is translated (protocol), run by `CompletionService.run` exactly as a chat request is (auth has happened;
quotas, privacy screening of prompt and output, the response cache, routing and metrics happen there), and its
answer translated back (output). Storing follows the privacy policy: with `[conversations] store = true`, a response
is stored unless the request says `store: false`, as the `conversations` surface rewrites it (not at all when that
surface blocks something in it); without it, `store: true` and `previous_response_id` are refused with a 400 that
says why, and a request that leaves `store` out is simply not stored. Stored responses are visible to their owner
(the key or user that made them, and that user's other keys and sessions) and to holders of `privacy:admin`; to
anyone else they do not exist (404). Deletions, and an admin's reads of someone else's, are audited."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import msgspec

from appliance.audit import AuditLog
from appliance.auth.guards import effective_permissions
from appliance.auth.keys import Principal
from appliance.auth.rbac import Rbac
from appliance.auth.sessions import SessionPrincipal
from appliance.cache.keys import Directive
from appliance.errors import InvalidRequest, NotFound
from appliance.feedback.ledger import ResponseLedger
from appliance.gateway.responses.output import Draft, StreamTranslator, whole_response
from appliance.gateway.responses.protocol import Item, ResponsesRequest, chat_body, input_items
from appliance.gateway.responses.store import ResponseStore, StoredResponse
from appliance.gateway.schemas import ChatCompletionRequest, decode_request
from appliance.gateway.service import SERVED_HEADER, Completed, CompletionService, Streamed
from appliance.privacy.actions import Placeholders
from appliance.privacy.service import Privacy

AnyPrincipal = Principal | SessionPrincipal
ADMIN_PERMISSION = "privacy:admin"
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
STORAGE_FORBIDDEN = ("the privacy policy in force does not allow storing conversations ([conversations] store = "
                     "false), so {what}; send the whole conversation as 'input' with store=false (or leave 'store' "
                     "out), or ask an admin to set [conversations] store = true in the privacy policy "
                     "(policies/privacy.toml or PUT /api/privacy/policy)")


class ResponsesService:
    def __init__(self, completions: CompletionService, store: ResponseStore, privacy: Privacy, rbac: Rbac,
                 audit: AuditLog | None = None) -> None:
        self.completions = completions
        self.store = store
        self.privacy = privacy
        self.rbac = rbac
        self.audit = audit  # deletions, and reads of someone else's responses by privacy:admin
        self.ledger: ResponseLedger | None = None  # who got which response from which version (feedback)

    async def create(self, request: ResponsesRequest, principal: AnyPrincipal, cache: Directive | None = None
                     ) -> Completed | Streamed:
        storing = self._storing(request)
        items = self._history(request.previous_response_id, principal) + input_items(request.input)
        chat = decode_request(_encoder.encode(chat_body(request, items)), ChatCompletionRequest)
        draft = Draft.new(request, storing)
        result = await self.completions.run(chat, "/v1/responses", principal=principal, cache=cache)
        if self.ledger is not None:  # rated by its resp_ id (the chat's own id is never shown)
            self.ledger.note(draft.id, principal, result.headers.get(SERVED_HEADER, ""))
        if isinstance(result, Completed):
            response = whole_response(draft, _decoder.decode(result.body))
            self._keep(response, items, principal)
            return Completed(_encoder.encode(response), result.headers)
        return Streamed(self._events(draft, result.events, items, principal), result.headers)

    def _storing(self, request: ResponsesRequest) -> bool:
        if self.privacy.policy.store_conversations:
            return request.store is not False  # OpenAI's default is to store
        if request.store:
            raise InvalidRequest(STORAGE_FORBIDDEN.format(what="responses cannot be stored (store=true)"),
                                 param="store", code="storage_disabled")
        if request.previous_response_id:
            raise InvalidRequest(STORAGE_FORBIDDEN.format(what="no response is stored to continue from "
                                                          "(previous_response_id)"),
                                 param="previous_response_id", code="storage_disabled")
        return False

    def _history(self, previous_id: str | None, principal: AnyPrincipal) -> list[Item]:
        """The chained conversation: what the previous response's model saw, then what it answered."""
        if not previous_id:
            return []
        stored = self._visible(previous_id, principal, "previous_response_id")
        return [*stored.input, *stored.response.get("output", [])]

    async def _events(self, draft: Draft, upstream: AsyncIterator[bytes], items: list[Item],
                      principal: AnyPrincipal) -> AsyncIterator[bytes]:
        translator = StreamTranslator(draft)
        yield translator.encode(translator.start())
        error: Item | None = None
        try:
            pending = b""
            async for blob in upstream:
                *events, pending = (pending + blob).split(b"\n\n")
                out: list[Item] = []
                for chunk in _chunks(events):
                    if "error" in chunk:
                        error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                        break
                    out += translator.chunk(chunk)
                if out:
                    yield translator.encode(out)
                if error is not None:
                    break
        finally:  # a client that went away closes this generator: close the chat stream too (it settles quotas)
            close = getattr(upstream, "aclose", None)
            if close is not None:
                await close()
        if error is None and translator.finish_reason is None:
            error = {"code": "stream_ended", "message": "the model's stream ended before the answer was finished; "
                     "retry the request"}
        if error is not None:
            yield translator.encode(translator.fail(error))
            return
        final = translator.finish()
        assert translator.response is not None
        self._keep(translator.response, items, principal)
        yield translator.encode(final)

    # --- stored responses ------------------------------------------------------------------------------------

    def _keep(self, response: Item, items: list[Item], principal: AnyPrincipal) -> None:
        """Store the response and its input, rewritten by the `conversations` surface; when that surface blocks
        an entity found in them, nothing is stored and the response says `store: false`."""
        if not response["store"]:
            return
        screened = self._screened(response, items)
        if screened is None:
            response["store"] = False
            return
        self.store.save(*screened, owner=principal.subject, user_id=_user_of(principal))

    def _screened(self, response: Item, items: list[Item]) -> tuple[Item, list[Item]] | None:
        response, items = copy.deepcopy(response), copy.deepcopy(items)
        if self.privacy.passes_everything("conversations"):
            return response, items
        marks = Placeholders()  # one numbering for the whole conversation
        for holder, key in _texts(response, items):
            applied = self.privacy.apply("conversations", holder[key], marks)
            if applied.blocked:
                return None
            holder[key] = applied.text
        return response, items

    def _visible(self, response_id: str, principal: AnyPrincipal, param: str | None = None) -> StoredResponse:
        stored = self.store.get(response_id)
        user = _user_of(principal)
        if stored is not None and (stored.owner == principal.subject or (user and stored.user_id == user)):
            return stored
        if stored is not None and ADMIN_PERMISSION in effective_permissions(principal, self.rbac):
            if self.audit is not None:  # someone else's conversation, read by an admin: on the record
                self.audit.record(principal.subject, "response.read", response_id, owner=stored.owner)
            return stored
        if param == "previous_response_id":
            raise NotFound(f"previous response with id {response_id!r} not found (stored responses are kept for "
                           "the retention the privacy policy sets, and only their owner may continue them)",
                           param=param, code="previous_response_not_found")
        raise NotFound(f"no stored response with id {response_id!r}", param=param)

    def get(self, response_id: str, principal: AnyPrincipal) -> Item:
        return self._visible(response_id, principal).response

    def delete(self, response_id: str, principal: AnyPrincipal) -> Item:
        stored = self._visible(response_id, principal)
        self.store.delete(response_id)
        if self.audit is not None:
            self.audit.record(principal.subject, "response.delete", response_id, owner=stored.owner)
        return {"id": response_id, "object": "response", "deleted": True}

    def input_items(self, response_id: str, principal: AnyPrincipal, limit: int = 20,
                    order: Literal["asc", "desc"] = "desc", after: str | None = None) -> Item:
        """The stored input items, a page at a time as OpenAI lists them (newest first by default)."""
        items = self._visible(response_id, principal).input
        if order == "desc":
            items = items[::-1]
        if after is not None:
            ids = [i.get("id") for i in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


def _user_of(principal: AnyPrincipal) -> str | None:
    if isinstance(principal, SessionPrincipal):
        return principal.user_id
    return principal.owner_user_id


def _chunks(events: list[bytes]) -> Iterator[Item]:
    for event in events:
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            chunk: Any = _decoder.decode(event[6:])
            if isinstance(chunk, dict):
                yield chunk


def _texts(response: Item, items: list[Item]) -> Iterator[tuple[Item, str]]:
    """Every (holder, key) of free text in a response and its input items, for the privacy policy."""
    if isinstance(response.get("instructions"), str):
        yield response, "instructions"
    metadata = response.get("metadata") or {}
    for key in list(metadata):
        yield metadata, key
    for item in [*items, *response.get("output", [])]:
        for part in item.get("content") or []:
            if isinstance(part.get("text"), str):
                yield part, "text"
        for key in ("arguments", "output"):
            if isinstance(item.get(key), str):
                yield item, key
