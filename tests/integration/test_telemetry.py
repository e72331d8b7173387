"""Tracing and metrics of issue 17 through the real server and model: a chat's trace reaches an OTLP/HTTP receiver
(decoded with opentelemetry-proto) under the client's trace id, with the SERVER span, the steps' child spans and the
CLIENT worker span with its GenAI attributes; the traceparent goes on to the worker (here a `remote` model whose
upstream is the same server, so the upstream's SERVER span is the CLIENT span's child); nothing a user wrote is in
the exported bytes; /metrics has the GenAI histograms per version and the box's figures."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.integration.conftest import Running
from tests.otlp import CLIENT, INTERNAL, SERVER, OtlpReceiver, ReceivedSpan
from tests.server import DEFAULT_MODEL, appliance

CANARY = "quokka" + secrets.token_hex(6)  # a word no model, policy or span would write by itself
STEPS = {"auth", "privacy", "quota", "cache.lookup", "queue.wait"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced(start_server: Callable[..., Running], receiver: OtlpReceiver) -> Running:
    # the batch processor exports every 100 ms instead of 5 s, so that the test waits less
    return start_server({"APPLIANCE_TELEMETRY__ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
                         "APPLIANCE_LLAMACPP__THREADS": "1"})


@pytest.fixture(scope="module")
def api(traced: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=traced.url, headers=traced.headers, timeout=120) as client:
        yield client


def traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def stream_chat(api: httpx.Client, body: dict[str, object], header: str) -> tuple[str, list[dict[str, object]]]:
    """POST a streamed chat; (the version that served it, NAME@N; the decoded chunks)."""
    chunks = []
    headers = {"traceparent": header, "cache-control": "no-store"}
    with api.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return served_version(api, str(body["model"])), chunks


def served_version(api: httpx.Client, model: str) -> str:
    """The worker (NAME@N) that served `model`: the pool counts requests per worker."""
    workers = re.findall(rf'^appliance_worker_requests_total\{{outcome="ok",worker="({re.escape(model)}@\d+)"\}}',
                         api.get("/metrics").text, re.M)
    assert len(workers) == 1, workers
    return str(workers[0])


def trace_of(receiver: OtlpReceiver, trace_id: str, *names: str) -> dict[str, ReceivedSpan]:
    """The trace's spans by name, once all of `names` arrived."""
    def arrived(spans: list[ReceivedSpan]) -> bool:
        return set(names) <= {s.name for s in spans if s.trace_id == trace_id}

    return {s.name: s for s in receiver.wait_for(arrived) if s.trace_id == trace_id}


TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                           "parameters": {"type": "object", "properties": {"word": {"type": "string"}},
                                                          "required": ["word"]}}}]


def test_a_chat_is_one_trace_under_the_clients_trace_id_without_content(api: httpx.Client,
                                                                        receiver: OtlpReceiver) -> None:
    trace_id, parent, header = traceparent()
    messages = [
        {"role": "user", "content": f"Look up the word {CANARY}."},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "lookup", "arguments": json.dumps({"word": CANARY})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": f"{CANARY} is a made-up word."},
        {"role": "user", "content": "Say hello."},
    ]
    served, chunks = stream_chat(api, {"model": DEFAULT_MODEL, "messages": messages, "tools": TOOLS,
                                       "tool_choice": "none", "temperature": 0, "top_p": 0.9, "max_tokens": 8,
                                       "seed": 7, "stream_options": {"include_usage": True}}, header)
    usage = chunks[-1]["usage"]
    assert isinstance(usage, dict) and re.fullmatch(rf"{DEFAULT_MODEL}@\d+", served)
    operation = f"chat {DEFAULT_MODEL}"
    spans = trace_of(receiver, trace_id, "POST /v1/chat/completions", operation, *STEPS)

    server = spans["POST /v1/chat/completions"]
    assert server.kind == SERVER and server.parent_span_id == parent  # under the client's span
    assert server.attributes["http.route"] == "/v1/chat/completions"
    for step in STEPS:
        assert spans[step].kind == INTERNAL and spans[step].parent_span_id == server.span_id, step
    call = spans[operation]
    assert call.kind == CLIENT and call.parent_span_id == server.span_id
    assert spans["queue.wait"].end_ns <= call.start_ns <= call.end_ns <= server.end_ns
    attributes = call.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "llama.cpp"
    assert attributes["gen_ai.request.model"] == DEFAULT_MODEL
    assert attributes["gen_ai.response.model"] == served  # the version served, NAME@N
    assert attributes["gen_ai.request.temperature"] == 0.0 and attributes["gen_ai.request.top_p"] == 0.9
    assert attributes["gen_ai.request.max_tokens"] == 8 and attributes["gen_ai.request.seed"] == 7
    assert attributes["gen_ai.request.stream"] is True
    assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    reasons = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]  # type: ignore
    assert attributes["gen_ai.response.finish_reasons"] == reasons and reasons[0] in ("stop", "length")
    assert 0 < attributes["gen_ai.response.time_to_first_chunk"] < (call.end_ns - call.start_ns) / 1e9
    assert all(s.service == "appliance" for s in spans.values())
    # no span holds a receive/send child per chunk: the request's spans are the steps, the call and the server's
    assert len(spans) == len(STEPS) + 2
    assert CANARY.encode() not in b"".join(receiver.raw)


def test_rag_retrieval_is_a_step_and_its_query_is_not_exported(api: httpx.Client, receiver: OtlpReceiver) -> None:
    assert api.post("/api/collections", json={"name": "notes"}).status_code == 201
    document = {"id": "d1", "text": f"The {CANARY} lives in the garden and eats clover every morning."}
    assert api.post("/api/collections/notes/documents", json=document).status_code == 201
    found = api.post("/api/collections/notes/query", json={"query": f"where does the {CANARY} live", "top_k": 1})
    assert found.status_code == 200 and found.json()["data"][0]["document_id"] == "d1"
    trace_id, _, header = traceparent()
    stream_chat(api, {"model": DEFAULT_MODEL, "max_tokens": 4, "rag": {"collections": ["notes"], "top_k": 1},
                      "messages": [{"role": "user", "content": f"Where does the {CANARY} live?"}]}, header)
    spans = trace_of(receiver, trace_id, "rag.retrieval", f"chat {DEFAULT_MODEL}")
    assert spans["rag.retrieval"].attributes["gen_ai.operation.name"] == "retrieval"
    assert spans["rag.retrieval"].parent_span_id == spans["POST /v1/chat/completions"].span_id
    receiver.wait_for(lambda spans: any(s.name == "POST /api/collections/{name}/query" for s in spans))
    assert CANARY.encode() not in b"".join(receiver.raw)


def test_embeddings_are_a_span_without_their_input(api: httpx.Client, receiver: OtlpReceiver) -> None:
    trace_id, _, header = traceparent()
    response = api.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [f"the {CANARY} sleeps"]},
                        headers={"traceparent": header})
    assert response.status_code == 200, response.text
    span = trace_of(receiver, trace_id, "embeddings all-minilm-l6-v2")["embeddings all-minilm-l6-v2"]
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert span.attributes["gen_ai.usage.input_tokens"] == response.json()["usage"]["prompt_tokens"]
    assert span.attributes["gen_ai.embeddings.dimension.count"] == len(response.json()["data"][0]["embedding"])
    assert CANARY.encode() not in b"".join(receiver.raw)


def test_the_traceparent_goes_on_to_the_worker(traced: Running, api: httpx.Client, receiver: OtlpReceiver) -> None:
    """A `remote` model whose upstream is this same server: the upstream's SERVER span is the child of the
    gateway's CLIENT span, so the worker got the call's traceparent."""
    assert traced.process is not None
    appliance("models", "add-remote", "loop-smol", "--url", traced.url + "/v1", "--upstream-model", DEFAULT_MODEL,
              "--api-key-stdin", data_dir=traced.process.data_dir, input=traced.key + "\n")
    trace_id, _, header = traceparent()
    served, _ = stream_chat(api, {"model": "loop-smol", "max_tokens": 4,
                                  "messages": [{"role": "user", "content": "Hi"}]}, header)
    assert served.startswith("loop-smol@")

    def both_calls(spans: list[ReceivedSpan]) -> bool:
        return {"chat loop-smol", f"chat {DEFAULT_MODEL}"} <= {s.name for s in spans if s.trace_id == trace_id}

    spans = [s for s in receiver.wait_for(both_calls) if s.trace_id == trace_id]
    outer = next(s for s in spans if s.name == "chat loop-smol")
    assert outer.attributes["gen_ai.provider.name"] == "remote"
    inner_server = [s for s in spans if s.kind == SERVER and s.parent_span_id == outer.span_id]
    assert [s.name for s in inner_server] == ["POST /v1/chat/completions"]
    inner_call = next(s for s in spans if s.name == f"chat {DEFAULT_MODEL}")
    assert inner_call.parent_span_id == inner_server[0].span_id


def test_metrics_have_the_genai_histograms_per_version_and_the_box(api: httpx.Client) -> None:
    served, _ = stream_chat(api, {"model": DEFAULT_MODEL, "max_tokens": 6,
                                  "messages": [{"role": "user", "content": "Count to five."}]}, traceparent()[2])
    text = api.get("/metrics").text
    labels = (f'gen_ai_operation_name="chat",gen_ai_provider_name="llama.cpp",gen_ai_request_model="{DEFAULT_MODEL}",'
              f'gen_ai_response_model="{served}"')
    for name in ("gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds"):
        count = re.search(rf"^{name}_count\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
        assert count and float(count.group(1)) >= 1, name
    assert re.search(rf'^gen_ai_server_request_duration_seconds_bucket\{{error_type="",{re.escape(labels)},le="81.92"'
                     r"\} [1-9]", text, re.M) or re.search(
        rf'^gen_ai_server_request_duration_seconds_bucket\{{{re.escape(labels)},error_type="",le="81.92"\}} [1-9]',
        text, re.M)
    assert 'le="0.001"' in text and 'le="2.5"' in text  # the conventions' boundaries
    for name in ("appliance_cpu_usage_ratio", "appliance_memory_available_bytes", "appliance_data_dir_disk_free_bytes"):
        assert re.search(rf"^{name} \d", text, re.M), name
    assert re.search(rf'^appliance_worker_resident_bytes\{{worker="{re.escape(served)}"\}} [1-9]', text, re.M)
