"""Stored responses (table `responses`, migration 11), kept only where the privacy policy allows storing
conversations. A row holds the response object and every input item the model saw (the chained history, then the
request's input), as the `conversations` surface of the privacy policy rewrote them; its owner is the principal
that created it (`key:<id>` or `user:<id>`) and the user behind it, if any.

`ConversationStore` is the same table as a privacy store (data class `conversations`): purged by age, erased by
subject (their own responses, and any that mention their email address or its pseudonym), reported and
compacted."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from appliance.gateway.responses.protocol import Item
from appliance.privacy.retention import StoreReport, Subject, compact_sqlite, subject_condition

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


@dataclass(frozen=True)
class StoredResponse:
    id: str
    owner: str
    user_id: str
    created_at: str
    input: list[Item]
    response: Item


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class ResponseStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def save(self, response: Item, items: list[Item], owner: str, user_id: str | None) -> None:
        self.conn.execute("INSERT INTO responses (id, owner, user_id, created_at, input, response) "
                          "VALUES (?, ?, ?, ?, ?, ?)",
                          (response["id"], owner, user_id or "", _iso(datetime.now(UTC)),
                           _encoder.encode(items).decode(), _encoder.encode(response).decode()))

    def get(self, response_id: str) -> StoredResponse | None:
        row = self.conn.execute("SELECT id, owner, user_id, created_at, input, response FROM responses WHERE id = ?",
                                (response_id,)).fetchone()
        if row is None:
            return None
        return StoredResponse(row["id"], row["owner"], row["user_id"], row["created_at"], _decoder.decode(row["input"]),
                              _decoder.decode(row["response"]))

    def delete(self, response_id: str) -> bool:
        return self.conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0


class ConversationStore:
    """`responses` under retention (`conversations`) and erasure (appliance.privacy.retention.ErasableStore)."""

    data_class = "conversations"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def purge_older_than(self, cutoff: datetime) -> int:
        return self.conn.execute("DELETE FROM responses WHERE created_at < ?", (_iso(cutoff),)).rowcount

    def count_older_than(self, cutoff: datetime) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM responses WHERE created_at < ?",
                                     (_iso(cutoff),)).fetchone()[0])

    def erase_subject(self, subject: Subject) -> int:
        """Responses the subject made (as a user or with any of their keys), and any that mention their email
        address or its pseudonym (a user name alone is too short a word to search text for)."""
        condition, params = subject_condition(subject, ("input", "response"))
        if not condition:
            return 0
        return self.conn.execute(f"DELETE FROM responses WHERE {condition}", params).rowcount  # noqa: S608

    def report(self) -> StoreReport:
        count, oldest = self.conn.execute("SELECT COUNT(*), MIN(created_at) FROM responses").fetchone()
        return StoreReport(self.data_class, count, datetime.fromisoformat(oldest) if oldest else None,
                           note="responses stored by /v1/responses (store=true)")

    def compact(self) -> None:
        compact_sqlite(self.conn)
