"""`GET /api/audit` filtered by outcome and action prefix, newest first, paged by seq both ways, the same filters in
the JSON lines export; `POST /api/audit/verify` on an intact log, on one tampered with in SQLite (naming the record),
and on a log of 10,000+ records, paged without reading it all. Records are written to the real database by the real
audit log, as the CLI writes them beside a running server."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from appliance.audit import AuditLog
from appliance.datadir import DataDir
from tests.integration.conftest import Running, new_key

ACTIONS = [("model.pull", "ok"), ("model.remove", "denied"), ("key.create", "ok"), ("model.load", "error"),
           ("key.revoke", "ok"), ("models_x.other", "ok")]


@contextlib.contextmanager
def audit_log(server: Running) -> Iterator[AuditLog]:
    assert server.process is not None
    with contextlib.closing(DataDir(server.process.data_dir).connect()) as conn:
        yield AuditLog(conn)


@pytest.fixture(scope="module")
def site(start_server: Callable[..., Running]) -> Running:
    """A server whose audit log holds 30 more records of known actions and outcomes."""
    running = start_server(wait_ready=False)
    with audit_log(running) as log:
        for i in range(30):
            action, outcome = ACTIONS[i % len(ACTIONS)]
            log.record("cli:tester", action, f"target-{i}", outcome)  # type: ignore[arg-type]
    return running


def get(server: Running, **params: Any) -> httpx.Response:
    return httpx.get(server.url + "/api/audit", headers=server.headers, params=params, timeout=60)


def records(server: Running, **params: Any) -> list[dict[str, Any]]:
    response = get(server, **params)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def verify(server: Running, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else server.headers
    return httpx.post(server.url + "/api/audit/verify", headers=headers, timeout=120)


def test_newest_first_and_cursor_paging_both_ways(site: Running) -> None:
    oldest_first = records(site, limit=1000)
    newest_first = records(site, limit=1000, order="desc")
    assert len(oldest_first) >= 31 and all(isinstance(r["seq"], int) for r in oldest_first)
    assert [r["seq"] for r in newest_first] == [r["seq"] for r in reversed(oldest_first)]
    pages, cursor = [], None
    while True:  # the UI's "older" button: before the last seq shown
        response = get(site, order="desc", limit=7, **({"before_seq": cursor} if cursor else {}))
        page = response.json()
        pages.append(page["data"])
        if not page["has_more"]:
            break
        cursor = page["data"][-1]["seq"]
    assert [r for p in pages for r in p] == newest_first and all(len(p) == 7 for p in pages[:-1])
    middle = oldest_first[10]["seq"]
    assert [r["seq"] for r in records(site, after_seq=middle, limit=3)] == [middle + 1, middle + 2, middle + 3]
    assert [r["seq"] for r in records(site, before_seq=middle, order="desc", limit=2)] == [middle - 1, middle - 2]


def test_outcome_and_action_prefix_filters_in_json_and_in_json_lines(site: Running) -> None:
    denied = records(site, outcome="denied", actor="cli:tester", limit=1000)
    assert len(denied) == 5 and {(r["action"], r["outcome"]) for r in denied} == {("model.remove", "denied")}
    models = records(site, action="model.*", limit=1000)
    assert {r["action"] for r in models} >= {"model.pull", "model.remove", "model.load"}
    assert all(r["action"].startswith("model.") for r in models)  # models_x.other is not model.*
    failed_models = records(site, action="model.*", outcome="error", actor="cli:tester", order="desc", limit=1000)
    assert [r["action"] for r in failed_models] == ["model.load"] * 5
    assert [r["seq"] for r in failed_models] == sorted((r["seq"] for r in failed_models), reverse=True)
    assert [r["seq"] for r in records(site, action="key.create", limit=1000)] == \
        [r["seq"] for r in records(site, action="key.create*", limit=1000)]
    lines = get(site, format="jsonl", action="model.*", outcome="error", actor="cli:tester", order="desc")
    assert lines.status_code == 200 and lines.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line) for line in lines.text.splitlines()] == failed_models
    for params in ({"outcome": "maybe"}, {"order": "sideways"}, {"before_seq": "-1"}, {"after_seq": "x"}):
        refused = get(site, **params)
        assert refused.status_code == 400, params
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}


def test_verify_says_intact_and_counts_the_records(site: Running) -> None:
    response = verify(site)
    assert response.status_code == 200, response.text
    result = response.json()
    everything = records(site, limit=1000)
    assert (result["intact"], result["first_broken"], result["reason"]) == (True, None, None)
    assert result["records"] >= len(everything) and result["last_hash"] and result["warnings"] == []
    assert site.process is not None
    assert verify(site, new_key(site.process.data_dir, role="auditor")).status_code == 200
    assert verify(site, new_key(site.process.data_dir, role="user")).status_code == 403


def test_verify_names_the_first_record_tampered_with(start_server: Callable[..., Running]) -> None:
    server = start_server(wait_ready=False)
    assert server.process is not None
    with contextlib.closing(sqlite3.connect(server.process.data_dir / "appliance.db", isolation_level=None)) as conn:
        conn.execute("DROP TRIGGER audit_log_no_update")  # what someone with the file can do
        conn.execute("UPDATE audit_log SET actor = 'cli:someone-else' WHERE seq = 2")
    result = verify(server).json()
    assert (result["intact"], result["first_broken"], result["records"]) == (False, 2, 1)
    assert "record 2: hash does not match its contents (altered)" in result["reason"]
    assert any("audit_log_no_update" in w for w in result["warnings"])


def test_ten_thousand_records_are_paged_without_reading_them_all(site: Running) -> None:
    with audit_log(site) as log, log.transaction():
        for i in range(10_000):
            log.record("cli:bulk", "key.create", f"k{i}", name=f"k{i}")
    newest = records(site, order="desc", limit=1)[0]["seq"]
    started = time.perf_counter()
    for cursor in (newest, newest // 2, 50):
        page = records(site, order="desc", before_seq=cursor, limit=100)
        assert [r["seq"] for r in page] == list(range(cursor - 1, max(cursor - 101, 0), -1))
    elapsed = time.perf_counter() - started
    assert elapsed < 3, f"three pages took {elapsed:.2f}s"
    started = time.perf_counter()
    result = verify(site).json()
    assert result["intact"] and result["records"] >= 10_030
    print(f"verify of {result['records']} records: {time.perf_counter() - started:.2f}s")

