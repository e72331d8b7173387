"""The Responses API's routes (`/v1/responses`, chat:use): thin handlers over `ResponsesService`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter
from litestar.response import Stream

from appliance.auth.guards import permission
from appliance.cache.keys import directive_of
from appliance.gateway.responses.protocol import decode_responses_request
from appliance.gateway.responses.service import ResponsesService
from appliance.gateway.routes import SSE_HEADERS
from appliance.gateway.service import Completed

STORED = ("Only where the privacy policy allows storing conversations; the owner (or privacy:admin) only, anyone "
          "else gets 404.")


def _service(state: State) -> ResponsesService:
    service: ResponsesService = state.services.responses
    return service


class ResponsesController(Controller):
    path = "/v1/responses"
    tags = ("OpenAI-compatible",)

    @post("/", summary="Create a model response (OpenAI Responses API)", status_code=200, opt=permission("chat:use"),
          description="Input as text or items (messages, function_call, function_call_output), instructions, "
          "function tools, tool_choice, text.format, streaming events; runs through the chat-completions path. "
          "`store` and `previous_response_id` work only where the privacy policy allows storing conversations.")
    async def create(self, request: Request[Any, Any, State]) -> Response[bytes] | Stream:
        body = decode_responses_request(await request.body())
        request.scope["state"]["model"] = body.model
        result = await _service(request.app.state).create(body, request.user, directive_of(body.cache,
                                                                                          request.headers))
        if isinstance(result, Completed):
            return Response(result.body, media_type="application/json", headers=result.headers)
        return Stream(result.events, media_type="text/event-stream", headers={**SSE_HEADERS, **result.headers})

    @get("/{response_id:str}", summary="Get a stored response", description=STORED, opt=permission("chat:use"))
    async def retrieve(self, request: Request[Any, Any, State], response_id: FromPath[str]) -> dict[str, Any]:
        return _service(request.app.state).get(response_id, request.user)

    @delete("/{response_id:str}", summary="Delete a stored response", description=STORED, status_code=200,
            opt=permission("chat:use"))
    async def remove(self, request: Request[Any, Any, State], response_id: FromPath[str]) -> dict[str, Any]:
        return _service(request.app.state).delete(response_id, request.user)

    @get("/{response_id:str}/input_items", summary="List a stored response's input items", description=STORED,
         opt=permission("chat:use"))
    async def input_items(self, request: Request[Any, Any, State], response_id: FromPath[str],
                          limit: Annotated[int, QueryParameter(ge=1, le=100, description="1 to 100")] = 20,
                          order: Annotated[Literal["asc", "desc"], QueryParameter(description="asc or desc")] = "desc",
                          after: Annotated[str | None, QueryParameter(description="list after this item id")] = None,
                          ) -> dict[str, Any]:
        return _service(request.app.state).input_items(response_id, request.user, limit, order, after)
