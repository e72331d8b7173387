"""Usage history: requests and tokens per UTC hour, user, API key and model (`usage_hourly`), recorded by the
gateway once a completion's usage is settled and read back by `GET /api/usage` per hour or day, as JSON or CSV.
It ages out with the privacy policy's `usage` retention and goes with its subject on erasure
(`appliance.privacy.retention.UsageStore`).

A row's `user_id` is the user who acted: a web session's user, or the owner of a key a user made for themselves
('' for a key made by an admin or the CLI); `key_id` is the API key ('' for a web session)."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime
from typing import Any, Literal

from appliance.errors import InvalidRequest
from appliance.logs import get_logger

log = get_logger(__name__)

Bucket = Literal["hour", "day"]
HOUR_FORMAT = "%Y-%m-%dT%H:00:00Z"
_BUCKET_SQL: dict[Bucket, str] = {"hour": "u.hour", "day": "substr(u.hour, 1, 10)"}
_UPSERT = ("INSERT INTO usage_hourly(hour, user_id, key_id, model, served, requests, prompt_tokens, "
           "completion_tokens) VALUES (?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT(hour, user_id, key_id, model, served) DO "
           "UPDATE SET "
           "requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
           "completion_tokens = completion_tokens + excluded.completion_tokens")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def hour_start(moment: datetime) -> str:
    """The UTC hour `moment` falls in, as stored: 2026-12-02T13:00:00Z."""
    return moment.astimezone(UTC).strftime(HOUR_FORMAT)


def acting(principal: Any) -> tuple[str, str]:
    """(user id, key id) of a request's principal (an API key's `Principal`, a web `SessionPrincipal`, or None)."""
    user_id = getattr(principal, "user_id", None) or getattr(principal, "owner_user_id", None) or ""
    return str(user_id), str(getattr(principal, "key_id", "") or "")


def parse_time(text: str | None, param: str) -> datetime | None:
    """An ISO-8601 time from a query (a time without a zone is UTC), or None when not given."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRequest(f"{param} {text[:40]!r} is not an ISO-8601 time; use e.g. 2026-12-01 or "
                             "2026-12-01T12:00:00Z", param=param) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class UsageRow:
    """One bucket's usage by one user, key and model; `user` and `key_name` are '' when there is none (any more)."""

    bucket: str
    user: str
    user_id: str
    key_id: str
    key_name: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


COLUMNS = tuple(f.name for f in fields(UsageRow))


def csv_cell(value: object) -> object:
    """A cell a spreadsheet will not run: text starting like a formula gets a leading apostrophe (OWASP's advice
    against CSV injection; user, key and model names are chosen by users)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def to_csv(rows: Iterable[UsageRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    writer.writerows([csv_cell(v) for v in astuple(row)] for row in rows)
    return out.getvalue()


class UsageLog:
    def __init__(self, conn: sqlite3.Connection, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.conn = conn
        self.now = now

    def record(self, principal: Any, model: str, prompt_tokens: int, completion_tokens: int, served: str = "") -> None:
        """Count one request and its tokens in the current hour, under the version that served it (`served`,
        `name@N`); a failure to write is logged, never raised (the answer is already on its way)."""
        user_id, key_id = acting(principal)
        try:
            self.conn.execute(_UPSERT, (hour_start(self.now()), user_id, key_id, model, served,
                                        max(0, prompt_tokens), max(0, completion_tokens)))
        except sqlite3.Error as exc:
            log.warning("usage.record_failed", model=model, error=str(exc))

    def served(self, model: str) -> dict[str, int]:
        """Requests per version of `model` (`name@N`) in the history kept."""
        rows = self.conn.execute("SELECT served, SUM(requests) FROM usage_hourly WHERE model = ? AND served != '' "
                                 "GROUP BY served", (model,)).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def report(self, since: datetime | None = None, until: datetime | None = None,
               bucket: Bucket = "day") -> list[UsageRow]:
        """Usage per `bucket`, user, key and model: from the hour `since` falls in, up to `until` (exclusive)."""
        low = hour_start(since) if since else ""
        high = until.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if until else "~"  # "~" sorts after digits
        rows = self.conn.execute(
            f"SELECT {_BUCKET_SQL[bucket]} AS bucket, COALESCE(n.name, '') AS user, u.user_id, u.key_id, "  # noqa: S608
            "COALESCE(k.name, '') AS key_name, u.model, SUM(u.requests), SUM(u.prompt_tokens), "
            "SUM(u.completion_tokens) FROM usage_hourly u LEFT JOIN users n ON n.id = u.user_id "
            "LEFT JOIN api_keys k ON k.id = u.key_id WHERE u.hour >= ? AND u.hour < ? "
            "GROUP BY bucket, u.user_id, u.key_id, u.model ORDER BY bucket, user, key_name, u.model",
            (low, high)).fetchall()
        return [UsageRow(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), int(r[7]), int(r[8]), int(r[7]) + int(r[8]))
                for r in rows]
