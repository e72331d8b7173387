"""The response ledger and the feedback service over a real SQLite database: ledger rows are batched and read back
after a flush, ratings count per model version, the window is measured from the response, and erasure and retention
clear a rating's comment and giver but keep the rating."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from appliance.auth.keys import Principal
from appliance.auth.rbac import Rbac
from appliance.db import connect, migrate
from appliance.errors import InvalidRequest, NotFound
from appliance.feedback.ledger import ResponseLedger, response_id, split_served
from appliance.feedback.service import FeedbackClosed, FeedbackService
from appliance.feedback.store import FeedbackStore, ServedResponseStore
from appliance.privacy.retention import Subject
from appliance.privacy.service import Privacy

ALICE = Principal("a1", "alice", "user")
BOB = Principal("b1", "bob", "user")
ADMIN = Principal("z1", "root", "admin")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[ResponseLedger, FeedbackService, Clock]]:
    conn = connect(tmp_path / "a.db")
    migrate(conn)
    clock = Clock()
    ledger = ResponseLedger(conn, now=clock)

    def no_privacy() -> Privacy:
        raise AssertionError("no comment was given")

    service = FeedbackService(conn, ledger, no_privacy, Rbac.load(), 3600, CollectorRegistry(), now=clock)
    yield ledger, service, clock
    conn.close()


def body(response: str, rating: object) -> bytes:
    return msgspec.json.encode({"response_id": response, "rating": rating})


def test_ids_come_from_whole_bodies_and_the_first_streamed_chunk() -> None:
    assert response_id(b'{"id": "chatcmpl-1", "choices": []}') == "chatcmpl-1"
    assert response_id(b'data: {"id":"chatcmpl-2","choices":[]}\n\ndata: {"id":"chatcmpl-2"}\n\n') == "chatcmpl-2"
    assert response_id(b'data: {"error": {"message": "x"}}\n\n') == ""
    assert split_served("m@12") == ("m", 12) and split_served("m") == ("m", 0)


def test_the_ledger_writes_in_a_batch_off_the_request_path(parts: tuple[ResponseLedger, FeedbackService, Clock]
                                                           ) -> None:
    ledger, _, _ = parts

    async def serve() -> int:
        ledger.note("chatcmpl-1", ALICE, "m@1")
        ledger.note("chatcmpl-2", ALICE, "m@2")
        return int(ledger.conn.execute("SELECT COUNT(*) FROM served_responses").fetchone()[0])

    assert asyncio.run(serve()) == 0  # pending until the timer, a lookup or shutdown
    found = ledger.find("chatcmpl-2")
    assert found is not None and (found.owner, found.model, found.version) == ("key:a1", "m", 2)


def test_ratings_count_per_version_and_only_for_their_receiver(parts: tuple[ResponseLedger, FeedbackService, Clock]
                                                               ) -> None:
    ledger, service, clock = parts
    for n, served in enumerate(("m@1", "m@1", "m@2", "other@1")):
        ledger.note(f"chatcmpl-{n}", ALICE, served)
    for n, rating in enumerate((1, -1, -1, 1)):
        assert service.submit(body(f"chatcmpl-{n}", rating), ALICE)["rating"] == rating
    assert service.counts("m") == {1: {"up": 1, "down": 1}, 2: {"up": 0, "down": 1}}
    service.submit(body("chatcmpl-2", 1), ALICE)  # rating again replaces the rating
    assert service.counts("m")[2] == {"up": 1, "down": 0}
    with pytest.raises(NotFound):
        service.submit(body("chatcmpl-0", 1), BOB)
    assert service.submit(body("chatcmpl-0", -1), ADMIN)["rating"] == -1
    for bad in (0, 2, "up", None):
        with pytest.raises(InvalidRequest) as refused:
            service.submit(body("chatcmpl-0", bad), ALICE)
        assert refused.value.param == "rating"
    clock.now += timedelta(seconds=3601)
    with pytest.raises(FeedbackClosed, match="can no longer be rated"):
        service.submit(body("chatcmpl-0", 1), ALICE)


def test_erasure_and_retention_keep_the_bare_rating(parts: tuple[ResponseLedger, FeedbackService, Clock]) -> None:
    ledger, service, clock = parts
    ledger.note("chatcmpl-1", ALICE, "m@1")
    ledger.note("chatcmpl-2", BOB, "m@1")
    service.submit(body("chatcmpl-1", 1), ALICE)
    service.submit(body("chatcmpl-2", -1), BOB)
    conn = ledger.conn
    conn.execute("UPDATE feedback SET comment = 'mail me at x@example.org'")
    ratings, served = FeedbackStore(conn), ServedResponseStore(conn)
    assert ratings.erase_subject(Subject("alice", key_ids=frozenset({"a1"}))) == 1
    assert served.erase_subject(Subject("alice", key_ids=frozenset({"a1"}))) == 1
    rows = conn.execute("SELECT response_id, owner, comment, rating FROM feedback ORDER BY response_id").fetchall()
    assert [tuple(r) for r in rows] == [("chatcmpl-1", "", "", 1),
                                        ("chatcmpl-2", "key:b1", "mail me at x@example.org", -1)]
    assert ratings.erase_subject(Subject("x@example.org", terms=frozenset({"x@example.org"}))) == 1
    assert ratings.count_older_than(clock.now + timedelta(days=1)) == 0
    assert served.purge_older_than(clock.now + timedelta(days=1)) == 1
    assert service.counts("m") == {1: {"up": 1, "down": 1}}
