"""`ResponseLedger`: per response id, who got it and which version served it (table `served_responses`), so that
its receiver may rate it later. Noting a response costs an append to a list: rows are written in one batch a second
later (or at once when many are pending, before any lookup, and at shutdown), never inside a request's path."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from appliance.logs import get_logger

log = get_logger(__name__)
FLUSH_AFTER_SECONDS = 1.0
FLUSH_AT_ROWS = 256
_INSERT = ("INSERT OR IGNORE INTO served_responses (id, owner, user_id, model, version, created_at) "
           "VALUES (?, ?, ?, ?, ?, ?)")


class _Id(msgspec.Struct):
    id: str = ""


_id_decoder = msgspec.json.Decoder(_Id)


def response_id(body: bytes) -> str:
    """The top-level `id` of a whole OpenAI response body, or of the first chunk in SSE bytes ('' when none)."""
    if body.startswith(b"{"):
        payload = body
    else:
        payload = next((e[6:] for e in body.split(b"\n\n") if e.startswith(b"data: {")), b"")
    try:
        return _id_decoder.decode(payload).id if payload else ""
    except msgspec.DecodeError:  # an unexpected shape: not rateable, never an error for the client
        return ""


def split_served(served: str) -> tuple[str, int]:
    """`name@N` as (name, N); a bare name (no versions known) as (name, 0)."""
    name, _, version = served.rpartition("@")
    return (name, int(version)) if name and version.isdigit() else (served, 0)


def principal_ids(principal: object) -> tuple[str, str]:
    """(subject, user id) of a principal: who got a response (`key:<id>` or `user:<id>`) and the user behind it."""
    user = getattr(principal, "user_id", None) or getattr(principal, "owner_user_id", None) or ""
    return str(getattr(principal, "subject", "") or ""), str(user)


@dataclass(frozen=True)
class ServedResponse:
    id: str
    owner: str
    user_id: str
    model: str
    version: int
    created_at: datetime

    @property
    def served(self) -> str:
        return f"{self.model}@{self.version}" if self.version else self.model


class ResponseLedger:
    def __init__(self, conn: sqlite3.Connection, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.conn = conn
        self.now = now
        self.pending: list[tuple[str, str, str, str, int, str]] = []
        self._timer: asyncio.TimerHandle | None = None

    def note(self, response_id: str, principal: object, served: str) -> None:
        """Remember that `principal` got response `response_id`, served by version `served` (`name@N`)."""
        if not response_id:
            return
        owner, user_id = principal_ids(principal)
        model, version = split_served(served)
        self.pending.append((response_id, owner, user_id, model, version, self.now().isoformat(timespec="seconds")))
        if len(self.pending) >= FLUSH_AT_ROWS:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_AFTER_SECONDS, self.flush)
            except RuntimeError:  # no event loop (a script): write at once
                self.flush()

    def flush(self) -> None:
        """Write the pending rows in one statement; a failure is logged (those responses cannot be rated)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self.pending = self.pending, []
        if not rows:
            return
        try:
            self.conn.executemany(_INSERT, rows)
        except sqlite3.Error as exc:
            log.warning("feedback.ledger_write_failed", rows=len(rows), error=str(exc))

    def find(self, response_id: str) -> ServedResponse | None:
        self.flush()
        row = self.conn.execute("SELECT id, owner, user_id, model, version, created_at FROM served_responses "
                                "WHERE id = ?", (response_id,)).fetchone()
        if row is None:
            return None
        return ServedResponse(row[0], row[1], row[2], row[3], int(row[4]), datetime.fromisoformat(row[5]))
