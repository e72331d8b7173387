"""`POST /api/watermark/detect`: is a text watermarked by a model of this box? (watermark:detect;
`appliance.watermark.service`)."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.datastructures import State

from appliance.auth.guards import permission


@post("/api/watermark/detect", summary="Test a text for a model's watermark: {model, text} -> {watermarked, "
      "z_score, tokens_scored}", status_code=200, opt=permission("watermark:detect"), tags=["Watermark"])
async def detect_watermark(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    services = state.services
    result: dict[str, Any] = await services.watermark.detect(await request.body(), request.user,
                                                             services.detect_model, services.detect_tokens)
    return result


WATERMARK_ROUTES = [detect_watermark]
