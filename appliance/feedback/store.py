"""The quality loop's data as privacy stores: ratings with their comments (data class `conversations`) and the
served-responses ledger (ids and versions, no content; data class `usage`). Purge and erasure of ratings clear the
comment and who gave it and keep the bare rating, so that a version's counts survive while nothing points at a
person."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from appliance.privacy.retention import StoreReport, Subject, compact_sqlite, subject_condition

_ANONYMOUS = "(comment != '' OR owner != '' OR user_id != '')"


def _oldest(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


class FeedbackStore:
    data_class = "conversations"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def purge_older_than(self, cutoff: datetime) -> int:
        return self.conn.execute(f"UPDATE feedback SET comment = '', owner = '', user_id = '' WHERE {_ANONYMOUS} "  # noqa: S608
                                 "AND created_at < ?", (cutoff.isoformat(timespec="seconds"),)).rowcount

    def count_older_than(self, cutoff: datetime) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM feedback WHERE {_ANONYMOUS} AND created_at < ?",  # noqa: S608
                                     (cutoff.isoformat(timespec="seconds"),)).fetchone()[0])

    def erase_subject(self, subject: Subject) -> int:
        """Ratings the subject gave (as a user or with any of their keys), and any whose comment mentions their
        email address or its pseudonym: comment and giver cleared."""
        condition, params = subject_condition(subject, ("comment",))
        if not condition:
            return 0
        return self.conn.execute(f"UPDATE feedback SET comment = '', owner = '', user_id = '' WHERE {_ANONYMOUS} "  # noqa: S608
                                 f"AND ({condition})", params).rowcount

    def report(self) -> StoreReport:
        count, oldest = self.conn.execute(f"SELECT COUNT(*), MIN(created_at) FROM feedback WHERE {_ANONYMOUS}"  # noqa: S608
                                          ).fetchone()
        return StoreReport(self.data_class, int(count), _oldest(oldest),
                           note="ratings of responses with their giver and comment")

    def compact(self) -> None:
        compact_sqlite(self.conn)


class ServedResponseStore:
    data_class = "usage"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def purge_older_than(self, cutoff: datetime) -> int:
        return self.conn.execute("DELETE FROM served_responses WHERE created_at < ?",
                                 (cutoff.isoformat(timespec="seconds"),)).rowcount

    def count_older_than(self, cutoff: datetime) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM served_responses WHERE created_at < ?",
                                     (cutoff.isoformat(timespec="seconds"),)).fetchone()[0])

    def erase_subject(self, subject: Subject) -> int:
        condition, params = subject_condition(subject, ())
        if not condition:
            return 0
        return self.conn.execute(f"DELETE FROM served_responses WHERE {condition}", params).rowcount  # noqa: S608

    def report(self) -> StoreReport:
        count, oldest = self.conn.execute("SELECT COUNT(*), MIN(created_at) FROM served_responses").fetchone()
        return StoreReport(self.data_class, int(count), _oldest(oldest),
                           note="which key or user got each response and which model version served it")

    def compact(self) -> None:
        compact_sqlite(self.conn)
