"""RAG with its vectors on a real Chroma server (`chroma run`, behind a token-checking proxy as a deployment would
have it): what reaches the server, the server down (503 with Retry-After, the rest serving, /readyz), the server
killed and restarted mid-ingestion (the job retries, the collection ends whole) and `rag check --repair` across
the journal on the box and the server."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.chroma_server import ChromaRun, TokenProxy
from tests.integration.conftest import Running
from tests.integration.test_rag import DOCS, SITE, top_document
from tests.server import appliance, wait_until

pytestmark = pytest.mark.slow
TOKEN = "chroma-Token-7f3a9c"
LONG = "# Lighthouses\n\n" + "\n\n".join(
    f"## Rock {i}\n\nThe lighthouse keeper on rock {i} trims the wick, polishes the Fresnel lens and logs the "
    f"passing ships; storms of force {i % 12} shake the tower while the foghorn sounds." for i in range(40))
SECRET_WORDS = ("volcano", "magma", "sourdough", "yeast", "checkmate", "bishops", "lighthouse", "fresnel", "foghorn",
                "baking", "chess", "corpus", "beacons")
REST = "/api/v2/tenants/default_tenant/databases"
CORPUS = "corpus"




@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaRun]:
    server = ChromaRun(tmp_path_factory.mktemp("chroma") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(chroma: ChromaRun) -> Iterator[TokenProxy]:
    front = TokenProxy(chroma.url, TOKEN)
    yield front
    front.close()


@pytest.fixture(scope="module")
def pause(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pause") / "ingest"


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running], proxy: TokenProxy, pause: Path) -> Running:
    def set_token(data: Path) -> None:
        appliance("rag", "chroma-token", data_dir=data, input=TOKEN + "\n")

    return start_server({"PYTHONPATH": os.pathsep.join([SITE, os.environ.get("PYTHONPATH", "")]),
                         "APPLIANCE_RAG__CHROMA_URL": proxy.url, "APPLIANCE_RAG__JOB_THRESHOLD_BYTES": "3000",
                         "APPLIANCE_TEST_RAG_PAUSE_DOC": "lighthouses", "APPLIANCE_TEST_RAG_PAUSE_AT": "pending",
                         "APPLIANCE_TEST_RAG_PAUSE_FILE": str(pause)}, prepare=set_token)


@pytest.fixture(scope="module")
def api(box: Running) -> Iterator[httpx.Client]:
    """An admin client of the box, whose collection `corpus` holds DOCS (added in one request)."""
    with httpx.Client(base_url=box.url, headers=box.headers, timeout=120) as client:
        assert client.post("/api/collections", json={"name": CORPUS}).status_code == 201
        added = client.post(f"/api/collections/{CORPUS}/documents", json={"documents": [
            {"id": doc_id, "text": text, "format": "markdown"} for doc_id, text in DOCS.items()]})
        assert added.status_code == 201, added.text
        yield client


def our_database(chroma: ChromaRun) -> str:
    names = [d["name"] for d in httpx.get(chroma.url + REST).json() if d["name"].startswith("appliance-")]
    assert len(names) == 1, names
    return str(names[0])


def stored(chroma: ChromaRun, database: str) -> dict[str, dict[str, Any]]:
    """Each collection on the server (by name) with what it holds, read straight from Chroma's REST API."""
    out = {}
    for collection in httpx.get(f"{chroma.url}{REST}/{database}/collections").json():
        got = httpx.post(f"{chroma.url}{REST}/{database}/collections/{collection['id']}/get",
                         json={"include": ["documents", "metadatas"]}).json()
        out[collection["name"]] = {"id": collection["id"], **got}
    return out


def test_the_server_holds_only_vectors_and_random_keys(api: httpx.Client, chroma: ChromaRun,
                                                       proxy: TokenProxy) -> None:
    for mode in ("vector", "hybrid"):
        assert top_document(api, CORPUS, "molten rock coming out of a mountain", mode) == "volcanoes"
    collections = stored(chroma, our_database(chroma))
    assert len(collections) == 1 and all(name.startswith("c_") for name in collections)
    (held,) = collections.values()
    assert len(held["ids"]) >= 3 and set(held["documents"]) == {None}
    assert all(set(meta) == {"doc", "position"} for meta in held["metadatas"])
    assert not {doc_id for doc_id in DOCS} & {meta["doc"] for meta in held["metadatas"]}
    sent = b"\n".join(proxy.bodies).lower()  # every byte the appliance sent to Chroma
    assert proxy.bodies and not [word for word in SECRET_WORDS if word.encode() in sent]
    assert proxy.refused == 0  # the token went with every request
    assert httpx.get(proxy.url + REST).status_code == 401  # and the proxy does refuse a request without it


def test_a_server_down_is_a_503_for_vectors_and_the_rest_keeps_serving(
        api: httpx.Client, chroma: ChromaRun, box: Running) -> None:
    chroma.kill()
    try:
        down = api.post(f"/api/collections/{CORPUS}/query", json={"query": "lava", "mode": "hybrid"})
        assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1
        error = down.json()["error"]
        assert error["code"] == "vector_store_unavailable" and set(error) >= {"message", "type", "param", "code"}
        assert "Chroma server" in error["message"] and TOKEN not in down.text
        assert top_document(api, CORPUS, "sourdough starter", "keyword") == "baking"  # the keyword index is here
        refused = api.post(f"/api/collections/{CORPUS}/documents", json={"id": "late", "text": "Beacons glow."})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "vector_store_unavailable"
        assert httpx.get(box.url + "/readyz").status_code == 503
        reply = box.client().chat.completions.create(model="smollm2-135m-instruct", max_tokens=4,
                                                     messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content is not None  # chat does not need Chroma
    finally:
        chroma.start()
    wait_until(lambda: httpx.get(box.url + "/readyz").status_code == 200, "/readyz back at 200")
    # the refused document was pending on the box: the watcher finishes it (absent) once the server is back
    wait_until(lambda: api.post("/api/rag/check").json()["consistent"], "a consistent index")
    assert [d["id"] for d in api.get(f"/api/collections/{CORPUS}/documents").json()["data"]] == sorted(DOCS)
    assert top_document(api, CORPUS, "molten rock coming out of a mountain", "hybrid") == "volcanoes"


def test_server_restarted_mid_ingestion_the_job_retries_and_the_collection_is_whole(
        api: httpx.Client, chroma: ChromaRun, pause: Path) -> None:
    job = api.post(f"/api/collections/{CORPUS}/documents", json={"id": "lighthouses", "text": LONG,
                                                                  "format": "markdown"})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    wait_until(pause.with_suffix(".paused").exists, "ingestion to reach the vector store")
    chroma.kill()  # the journal says pending; Chroma is gone before the job's first write
    pause.with_suffix(".go").touch()
    waiting = wait_until(lambda: (v := api.get(f"/api/jobs/{job_id}").json())["error"] and v, "the job to report")
    assert waiting["state"] == "running" and waiting["stage"] == "waiting for the vector store"
    assert waiting["error"]["code"] == "vector_store_unavailable"
    chroma.start()
    done = wait_until(lambda: (v := api.get(f"/api/jobs/{job_id}").json())["state"] in ("done", "failed") and v,
                      "the job to end")
    assert done["state"] == "done" and done["error"] is None, done
    report = api.post("/api/rag/check").json()
    assert report["consistent"], report
    assert top_document(api, CORPUS, "keeper polishing the lens of a lighthouse", "vector") == "lighthouses"
    for doc_id, query in (("volcanoes", "lava erupts"), ("baking", "bread dough oven"), ("chess", "checkmate king")):
        assert top_document(api, CORPUS, query, "hybrid") == doc_id


def test_check_repairs_what_the_server_lost_or_gained_and_leaves_other_appliances_alone(
        api: httpx.Client, chroma: ChromaRun, proxy: TokenProxy, box: Running) -> None:
    database = our_database(chroma)
    ours = list(stored(chroma, database))
    (held,) = stored(chroma, database).values()
    base = f"{chroma.url}{REST}/{database}/collections"
    lost = held["ids"][0]
    assert httpx.post(f"{base}/{held['id']}/delete", json={"ids": [lost]}).is_success
    assert httpx.post(f"{base}/{held['id']}/add", json={
        "ids": ["ffffffffffffffffffffffffffffffff#0"], "embeddings": [[0.1] * 384],
        "metadatas": [{"doc": "ffffffffffffffffffffffffffffffff", "position": 0}]}).is_success
    assert httpx.post(base, json={"name": "c_0123456789abcdef"}).is_success  # a collection the journal never had
    assert httpx.post(chroma.url + REST, json={"name": "appliance-another"}).is_success  # another appliance's
    assert httpx.post(f"{chroma.url}{REST}/appliance-another/collections", json={"name": "c_fedcba9876543210"}
                      ).is_success

    found = api.post("/api/rag/check").json()
    assert not found["consistent"]
    assert found["missing_vectors"] == [lost]
    assert found["orphan_vectors"] == ["ffffffffffffffffffffffffffffffff#0"]
    assert found["orphan_collections"] == ["0123456789abcdef"]
    assert api.post("/api/rag/check", params={"repair": "true"}).status_code == 200
    assert api.post("/api/rag/check").json()["consistent"]
    assert list(stored(chroma, database)) == ours  # the stray collection is gone
    assert list(stored(chroma, "appliance-another")) == ["c_fedcba9876543210"]  # not ours: untouched

    assert box.process is not None
    box.process.stop()  # the CLI, with the server stopped, checks the same two stores
    checked = appliance("rag", "check", data_dir=box.process.data_dir, check=False,
                        env={"APPLIANCE_RAG__CHROMA_URL": proxy.url})
    assert checked.returncode == 0 and '"consistent": true' in checked.stdout, checked.stdout + checked.stderr
    assert TOKEN not in box.process.log_tail(10_000)  # the token is never logged


def test_vectors_move_from_embedded_chroma_to_the_server_by_repair(chroma: ChromaRun, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, with the RagIndex itself: a data dir whose vectors were embedded, pointed at the server."""
    from appliance.config import RagSettings
    from appliance.rag import index as rag_index
    from appliance.rag.chunking import Chunk
    from appliance.rag.index import RagIndex
    from appliance.rag.vectors import ChromaServer

    monkeypatch.setattr(rag_index, "REPAIR_BATCH", 2)  # several steps with a handful of chunks
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(5, 8)).astype(np.float32)
    texts = ["tide tables", "harbour pilots", "buoys and beacons", "anchorage", "breakwater"]
    embedded = RagIndex(tmp_path / "rag")
    cid = str(embedded.create_collection("charts", "user:u1", [], [], "m@1")["id"])
    embedded.put_document(cid, "charts", [Chunk(i, (), t) for i, t in enumerate(texts)], vectors, {}, "user:u1", 9)
    embedded.close()
    del embedded

    server = ChromaServer.from_settings(RagSettings(chroma_url=chroma.url), tmp_path / "keys")
    moved = RagIndex(tmp_path / "rag", server)
    try:
        assert moved.moved_from == "embedded"
        found = moved.check(repair=False)
        assert len(found.missing_vectors) == 5 and not found.consistent
        by_text = dict(zip(texts, vectors, strict=True))
        moved.check(repair=True, embed=lambda batch: np.vstack([by_text[t] for t in batch]))
        assert moved.check(repair=False).consistent
        hit = moved.vector_search([cid], vectors[2], 1)[0]
        assert moved.chunks([hit.chunk_key])[hit.chunk_key].text == "buoys and beacons"
    finally:
        moved.close()
