"""`POST /api/feedback`: rate a response one got (chat:use; `appliance.feedback.service`)."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.datastructures import State

from appliance.auth.guards import permission
from appliance.feedback.service import FeedbackService


@post("/api/feedback", summary="Rate a response you got: {response_id, rating: 1 or -1, comment?}",
      status_code=200, opt=permission("chat:use"), tags=["Feedback"])
async def submit_feedback(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    feedback: FeedbackService = state.services.feedback
    return feedback.submit(await request.body(), request.user)


FEEDBACK_ROUTES = [submit_feedback]
