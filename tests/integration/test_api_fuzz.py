"""API fuzzing (issue 18): schemathesis generates requests from the app's own OpenAPI document and sends them to
a real server of this module's own (fuzzed requests create keys, users, collections and erasures), with an admin
key and with a `user` key: no answer is a 5xx, and every status, body and content type is one the document
declares. tests/benchmarks/fuzz_api.py is the long run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuzz import fetch_schema, run_schemathesis
from tests.server import Running, new_key

MAX_EXAMPLES = 5
MIN_OPERATIONS = 50
"""The document has ~70 operations and a few are left out; far fewer tested means the run tested nothing."""


@pytest.fixture(scope="module")
def fuzzed(start_server: Callable[..., Running]) -> tuple[Running, dict[str, str]]:
    keys: dict[str, str] = {}

    def user_key(data: Path) -> None:
        keys["user"] = new_key(data, role="user")

    running = start_server(prepare=user_key)
    keys["admin"] = running.key
    return running, keys


@pytest.mark.timeout(900)
@pytest.mark.parametrize("role", ["admin", "user"])
def test_fuzzed_requests_get_documented_answers_and_no_5xx(
        role: str, fuzzed: tuple[Running, dict[str, str]], tmp_path: Path) -> None:
    running, keys = fuzzed
    schema = fetch_schema(running.url, keys["admin"], tmp_path / "openapi.json")
    rc, output, tested = run_schemathesis(schema, running.url, keys[role], MAX_EXAMPLES, tmp_path / "report")
    assert rc == 0, f"schemathesis found failures with the {role} key:\n{output[-12000:]}"
    assert tested >= MIN_OPERATIONS, output[-4000:]
    health = running.client().models.list()  # the server still serves after the run
    assert health.data
