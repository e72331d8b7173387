"""The quality loop through the real server, the real llama.cpp workers and the real default model, with the
openai SDK as the client: a bandit alias whose second version is always rated -1 moves its traffic off that version
by itself (x-served-model names the version each draw chose, and the rating of that response counts for it); a
canary whose responses are rated -1 is rolled back by the server, and the audit log says why. The second version is
the default GGUF with its `general.name` changed (as in test_rollout.py), pulled into the running server's data
dir."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import httpx
import openai
import pytest

from appliance.registry.versions import pick_weighted, sticky_bucket
from tests.integration.conftest import Running
from tests.integration.test_rollout import api, audit, keys, pull, with_metadata
from tests.server import DEFAULT_MODEL

QUESTION = [{"role": "user", "content": "Say hi"}]
SETTINGS = {"APPLIANCE_CACHE__ENABLED": "false", "APPLIANCE_ROLLOUT__QUALITY_MIN_RATINGS": "5"}
V1, V2 = f"{DEFAULT_MODEL}@1", f"{DEFAULT_MODEL}@2"


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running], model_file: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Running:
    """A server whose default model has a second version (staging)."""
    server = start_server(SETTINGS)
    name = bytes(gguf.GGUFReader(model_file).fields["general.name"].parts[-1])
    renamed = with_metadata(model_file, tmp_path_factory.mktemp("v2") / "renamed.gguf", "general.name",
                            b"Q" + name[1:])
    assert "(version 2, staging)" in pull(server, renamed)
    return server


def ask(client: openai.OpenAI, model: str) -> tuple[str, str]:
    """One chat completion: its id and the version that served it (x-served-model)."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
    return raw.parse().id, raw.headers["x-served-model"]


def rate(box: Running, response_id: str, rating: int) -> dict[str, Any]:
    answer = httpx.post(box.url + "/api/feedback", headers=box.headers, timeout=30,
                        json={"response_id": response_id, "rating": rating})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def alias(box: Running, name: str) -> dict[str, Any]:
    return next(a for a in api(box, "GET", "/api/aliases").json()["data"] if a["alias"] == name)


def share_metric(box: Running, alias_name: str, target: str) -> float:
    line = f'appliance_alias_share{{alias="{alias_name}",target="{target}"}} '
    text = api(box, "GET", "/metrics").text
    return next(float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line))


def test_a_bandit_moves_traffic_off_a_version_rated_down(box: Running) -> None:
    bad = api(box, "PUT", "/api/aliases/arena", json={"strategy": "bandit", "targets": [V1, V2], "floor": 0.7})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "floor"  # 2 targets allow at most 0.5
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    bad = api(box, "PUT", "/api/aliases/arena", json={"strategy": "bandit", "targets": [V1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "targets"
    unknown = api(box, "PUT", "/api/aliases/arena", json={"strategy": "bandit", "targets": [V1, "nope@1"]})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "targets"
    put = api(box, "PUT", "/api/aliases/arena", json={"strategy": "bandit", "targets": [V1, V2], "floor": 0.1})
    assert put.status_code == 200, put.text
    assert put.json()["shares"] == {V1: pytest.approx(0.5, abs=0.05), V2: pytest.approx(0.5, abs=0.05)}
    client = box.client()
    served: list[str] = []
    # ask and rate (version 2 always -1, version 1 always +1) until version 2 was tried and 12 requests were made;
    # the floor (each target keeps 10%) makes it unlikely (< 1 in 5000) that 60 go by without trying it
    while len(served) < 60 and (len(served) < 12 or V2 not in served):
        response_id, version = ask(client, "arena")
        assert rate(box, response_id, -1 if version == V2 else 1)["served_model"] == version
        served.append(version)
    shares = alias(box, "arena")["shares"]
    print(f"served {served}; shares now {shares}")
    assert V2 in served and shares[V2] <= 0.2  # it was tried, rated down, and 80% of the traffic left it
    arms = {a["target"]: a for a in alias(box, "arena")["arms"]}
    assert (arms[V2]["up"], arms[V2]["down"]) == (0, served.count(V2))
    assert arms[V1]["up"] == served.count(V1) and arms[V1]["served"] == V1
    assert share_metric(box, "arena", V2) <= 0.25 and share_metric(box, "arena", V1) >= 0.75
    changes = [r for r in audit(box, "model.alias") if r["target"] == "arena"]
    assert [r["outcome"] for r in changes] == ["error", "error", "error", "ok"]  # the refusals are audited too
    assert changes[-1]["details"]["strategy"] == "bandit" and changes[-1]["details"]["targets"] == [V1, V2]
    assert api(box, "DELETE", "/api/aliases/arena").status_code == 200


def test_a_canary_rated_down_is_rolled_back_by_the_server(box: Running) -> None:
    put = api(box, "PUT", "/api/aliases/chat", json={"target": DEFAULT_MODEL, "canary": 2, "weight": 50})
    assert put.status_code == 200, put.text
    assert put.json()["quality"]["2"]["decision"] == "waiting"
    subjects = list(keys(box, 8))
    sides = {k: pick_weighted({1: 50, 2: 50}, sticky_bucket("chat", f"key:{k}", 100)) for k, _ in subjects}
    assert set(sides.values()) == {1, 2}  # both sides have clients (fixed by the key ids)
    seen: list[str] = []
    for _ in range(10):  # rounds of one request per client, each rated (the canary -1), until the server ends it
        for _, secret in subjects:
            response_id, version = ask(box.client(secret), "chat")
            rate(box, response_id, -1 if version == V2 else 1)
            seen.append(alias(box, "chat").get("quality", {}).get("2", {}).get("decision", "ended"))
        if alias(box, "chat")["weights"] is None:
            break
    assert alias(box, "chat")["weights"] is None
    assert seen[0] == "waiting" and "ended" in seen  # not judged on the first ratings; then rolled back
    for key_id, secret in subjects:  # the canary's clients are served by the stable version again
        if sides[key_id] == 2:
            assert ask(box.client(secret), "chat")[1] == V1
    (record,) = [r for r in audit(box, "model.rollback") if r["actor"] == "supervisor"]
    details = record["details"]
    assert record["outcome"] == "ok" and details["trigger"] == "quality" and details["automatic"] is True
    assert details["canary_versions"] == [2] and details["aliases"] == ["chat"]
    assert details["canary_ratings"]["down"] >= 5 and details["production_ratings"]["up"] >= 5
    assert details["e_value"] >= details["threshold"]
