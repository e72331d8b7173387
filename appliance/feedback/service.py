"""`FeedbackService`: a rating (+1/-1, an optional comment) of one response by the principal that got it (or a
holder of `privacy:admin`) within `rollout.feedback_window_seconds` of it, stored against the version that served
it (`appliance.feedback.ledger`). Rating again replaces the rating. The comment passes through the privacy policy's
`conversations` surface; an entity that surface blocks refuses the comment (400). Counts per version feed
`GET /api/models/{name}/versions` and the `appliance_feedback_total` counter of /metrics; each rating also reaches
the rollout (`on_rating`), where it moves bandit aliases and judges canaries on quality."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter

from appliance.auth.guards import effective_permissions
from appliance.auth.rbac import Rbac
from appliance.errors import ApplianceError, InvalidRequest, NotFound
from appliance.feedback.ledger import ResponseLedger, principal_ids
from appliance.logs import get_logger
from appliance.privacy.service import Privacy

log = get_logger(__name__)

ADMIN_PERMISSION = "privacy:admin"
MAX_COMMENT_CHARS = 2000
EXAMPLE = '{"response_id": "chatcmpl-...", "rating": 1, "comment": "helpful"}'
RATINGS = {1: "up", -1: "down"}
_UPSERT = ("INSERT INTO feedback (response_id, owner, user_id, model, version, rating, comment, created_at) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(response_id) DO UPDATE SET rating = excluded.rating, "
           "comment = excluded.comment, created_at = excluded.created_at")


class FeedbackClosed(ApplianceError):
    """The response is older than the feedback window."""

    status_code = 410
    error_type = "invalid_request_error"
    code = "feedback_window_closed"


class FeedbackBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    response_id: str
    rating: int
    comment: str | None = None


class FeedbackService:
    def __init__(self, conn: sqlite3.Connection, ledger: ResponseLedger, privacy: Callable[[], Privacy],
                 rbac: Rbac, window_seconds: float, registry: CollectorRegistry,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.conn = conn
        self.ledger = ledger
        self.privacy = privacy
        self.rbac = rbac
        self.window = timedelta(seconds=window_seconds)
        self.now = now
        self.on_rating: Callable[[str, int], None] | None = None  # (model, version): the rollout's quality loop
        self.ratings = Counter("appliance_feedback", "Ratings of responses received, by the model version that "
                               "served them and rating (up, down).", ["model", "version", "rating"],
                               registry=registry)

    def submit(self, raw: bytes, principal: Any) -> dict[str, Any]:
        body = _decode(raw)
        served = self.ledger.find(body.response_id)
        subject, user_id = principal_ids(principal)
        own = served is not None and (served.owner == subject or bool(user_id and served.user_id == user_id))
        if served is None or not (own or ADMIN_PERMISSION in effective_permissions(principal, self.rbac)):
            raise NotFound(f"no response with id {body.response_id!r} to rate: only the key or user that got a "
                           "response (or a privacy admin) may rate it", param="response_id",
                           code="response_not_found")
        closes = served.created_at + self.window
        if self.now() > closes:
            raise FeedbackClosed(f"response {body.response_id!r} can no longer be rated: ratings are taken for "
                                 f"{_span(self.window)} after a response (rollout.feedback_window_seconds), and "
                                 f"that window closed at {closes.isoformat(timespec='seconds')}",
                                 param="response_id")
        comment = self._screened(body.comment or "")
        self.conn.execute(_UPSERT, (served.id, served.owner, served.user_id, served.model, served.version,
                                    body.rating, comment, self.now().isoformat(timespec="seconds")))
        self.ratings.labels(served.model, str(served.version), RATINGS[body.rating]).inc()
        if self.on_rating is not None and served.version:
            try:
                self.on_rating(served.model, served.version)
            except Exception:  # the rating is stored; judging it must not fail the request
                log.exception("feedback.on_rating_failed", model=served.model, version=served.version)
        return {"object": "feedback", "response_id": served.id, "served_model": served.served,
                "rating": body.rating, "comment": comment or None}

    def _screened(self, comment: str) -> str:
        if not comment:
            return ""
        applied = self.privacy().apply("conversations", comment)
        if applied.blocked:
            raise InvalidRequest(f"the comment holds {', '.join(sorted(applied.blocked))}, which the privacy policy "
                                 "does not allow to be stored; leave it out and rate again", param="comment",
                                 code="comment_blocked")
        return applied.text

    def counts(self, model: str) -> dict[int, dict[str, int]]:
        """{version: {"up": n, "down": n}} for `model`'s rated versions."""
        rows = self.conn.execute("SELECT version, SUM(rating = 1), SUM(rating = -1) FROM feedback WHERE model = ? "
                                 "GROUP BY version", (model,)).fetchall()
        return {int(r[0]): {"up": int(r[1]), "down": int(r[2])} for r in rows}


def _decode(raw: bytes) -> FeedbackBody:
    try:
        body = msgspec.json.decode(raw, type=FeedbackBody)
    except msgspec.ValidationError as exc:
        param = "rating" if "rating" in str(exc) else "comment" if "comment" in str(exc) else None
        raise InvalidRequest(f"{exc}; send e.g. {EXAMPLE}", param=param, code="invalid_body") from None
    except msgspec.DecodeError:
        raise InvalidRequest(f"the body is not JSON; send e.g. {EXAMPLE}", code="invalid_body") from None
    if body.rating not in RATINGS:
        raise InvalidRequest(f"rating must be 1 (thumbs up) or -1 (thumbs down), not {body.rating}",
                             param="rating", code="invalid_rating")
    if len(body.comment or "") > MAX_COMMENT_CHARS:
        raise InvalidRequest(f"the comment has {len(body.comment or '')} characters; at most {MAX_COMMENT_CHARS} "
                             "are kept, shorten it", param="comment", code="comment_too_long")
    if not body.response_id or len(body.response_id) > 200:
        raise InvalidRequest("response_id must be the id of a response you got (chatcmpl-..., cmpl-..., resp_...)",
                             param="response_id", code="invalid_response_id")
    return body


def _span(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"
