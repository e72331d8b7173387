"""The OpenAI-compatible API through the real server and model, driven by the official openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, NO_EOS

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>): banning them forces exactly max_tokens tokens.


def test_models_lists_the_default_model(server: Running) -> None:
    models = server.client().models.list()
    assert DEFAULT_MODEL in [m.id for m in models.data]


def test_chat_completion_is_deterministic_at_temperature_zero(server: Running) -> None:
    client = server.client()
    first = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    second = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    assert first.object == "chat.completion"
    assert first.model == DEFAULT_MODEL
    assert first.choices[0].message.content == second.choices[0].message.content
    assert (first.choices[0].message.content or "").strip()
    assert first.usage is not None
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_max_tokens_limits_and_reports_length(server: Running) -> None:
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, max_tokens=5, temperature=0, logit_bias=NO_EOS)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_streamed_chat_matches_the_whole_reply(server: Running) -> None:
    client = server.client()
    whole = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks), "usage is sent only when stream_options asks for it"


def test_stream_options_include_usage(server: Running) -> None:
    stream = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, max_tokens=7, temperature=0, stream=True,
        stream_options={"include_usage": True}, logit_bias=NO_EOS)
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 7
    assert last.usage.prompt_tokens > 0


def test_completions_stream_and_not(server: Running) -> None:
    client = server.client()
    whole = client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=8,
                                      temperature=0)
    assert whole.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
        if c.choices)
    assert streamed == whole.choices[0].text
    assert whole.choices[0].text.strip()


def test_stop_string_ends_the_completion_before_it(server: Running) -> None:
    client = server.client()
    free = client.completions.create(model=DEFAULT_MODEL, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0)
    text = free.choices[0].text
    assert len(text) > 4
    stop = text[3:5]
    cut = client.completions.create(model=DEFAULT_MODEL, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(server: Running, overrides: dict[str, object],
                                                        param: str) -> None:
    body = {"model": DEFAULT_MODEL, "messages": QUESTION, **overrides}
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(**body)  # type: ignore[call-overload]
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_unknown_model_is_404_model_not_found(server: Running) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="no-such-model", messages=QUESTION)
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_exceeded_gives_the_numbers(server: Running, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model=DEFAULT_MODEL, prompt="hello " * 5000, max_tokens=4000,
                                           stream=stream)
    assert caught.value.code == "context_length_exceeded"
    message = str(caught.value.body)
    assert "maximum context length is" in message and "4000 in the completion" in message


def test_malformed_json_and_oversized_bodies(server: Running) -> None:
    url = server.url + "/v1/chat/completions"
    bad = httpx.post(url, content=b"{not json", headers=server.headers)
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(url, content=b"x" * (9 * 1024 * 1024), headers=server.headers)
    assert huge.status_code == 413
    assert huge.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/schema/openapi.json"])
@pytest.mark.parametrize("auth", [None, "Bearer nope", "Bearer apl_' OR 1=1 --", "Basic YWRtaW46YWRtaW4="])
def test_routes_refuse_missing_or_bad_keys(server: Running, path: str, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    response = httpx.get(server.url + path, headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert "Traceback" not in response.text and "sqlite" not in response.text.lower()


def test_posts_refuse_missing_keys(server: Running) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = httpx.post(server.url + path, json={"model": DEFAULT_MODEL, "prompt": "x"})
        assert response.status_code == 401


def test_health_is_public_and_says_nothing_more(server: Running) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


def test_metrics_count_requests_tokens_and_latency(server: Running) -> None:
    client = server.client()
    list(client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=6, temperature=0,
                                        stream=True, logit_bias=NO_EOS))
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    for name in ("appliance_requests_total", "appliance_request_duration_seconds_bucket",
                 "appliance_time_to_first_token_seconds_bucket", "appliance_inter_token_latency_seconds_bucket",
                 "appliance_prompt_tokens_total", "appliance_completion_tokens_total",
                 "appliance_queue_wait_seconds_bucket", "appliance_model_load_seconds_count",
                 "appliance_worker_restarts_total"):
        assert name in text, name
    completion = [line for line in text.splitlines()
                  if line.startswith(f'appliance_completion_tokens_total{{model="{DEFAULT_MODEL}"}}')]
    assert completion and float(completion[0].split()[-1]) >= 6
    assert 'route="/v1/chat/completions",status="200"' in text.replace(f'model="{DEFAULT_MODEL}",', "")


def test_unknown_model_names_make_no_series_of_their_own(server: Running) -> None:
    def refused() -> float:
        text = httpx.get(server.url + "/metrics", headers=server.headers).text
        assert "no-such-model" not in text  # a client could otherwise grow the metrics without bound
        line = 'appliance_requests_total{model="",route="/v1/chat/completions",status="404"} '
        return sum(float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line))

    before = refused()
    for n in range(5):
        response = httpx.post(server.url + "/v1/chat/completions", headers=server.headers,
                              json={"model": f"no-such-model-{n}", "messages": QUESTION})
        assert response.status_code == 404
    assert refused() == before + 5


def test_refused_requests_are_counted_as_401(server: Running) -> None:
    httpx.get(server.url + "/v1/models")
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    assert 'appliance_requests_total{model="",route="/v1/models",status="401"}' in text


def test_request_id_is_returned(server: Running) -> None:
    response = httpx.get(server.url + "/v1/models", headers={**server.headers, "X-Request-Id": "abc123"})
    assert response.headers["x-request-id"] == "abc123"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.nip.io", "[2001:db8::1]:80"])
def test_foreign_host_headers_are_refused(server: Running, host: str) -> None:
    """DNS rebinding: a page on another origin that resolves to this box must not reach the API."""
    for path in ("/v1/models", "/healthz"):
        response = httpx.get(server.url + path, headers={**server.headers, "Host": host})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_host"


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1", "[::1]:8080"])
def test_local_host_headers_are_served(server: Running, host: str) -> None:
    assert httpx.get(server.url + "/v1/models", headers={**server.headers, "Host": host}).status_code == 200


def test_prompts_and_completions_never_reach_the_log(server: Running) -> None:
    if server.process is None:
        pytest.skip("needs the local server's log")
    marker = "zebra-quokka-" + "7f3a9c"
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": f"Repeat exactly: {marker}"}], max_tokens=24,
        temperature=0)
    completion = reply.choices[0].message.content or ""
    list(server.client().completions.create(model=DEFAULT_MODEL, prompt=f"{marker} {marker}", max_tokens=8,
                                            stream=True))
    log = server.process.log_path.read_text(errors="replace")
    assert '"path": "/v1/chat/completions"' in log  # the requests were logged, without their text
    assert marker not in log
    assert len(completion) < 8 or completion not in log
