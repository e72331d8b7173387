"""The watermark through the real server and the real default model: with `[watermark] enabled`, an answer sampled
at temperature 0.8 is detected by POST /api/watermark/detect; the same model's answer without the watermark
(llama-cpp-python on the same GGUF) and human text (the standard library's docstrings) are not; scoring the answer
with another key finds nothing; greedy decoding stays deterministic; bad input is a 4xx in the OpenAI shape, and
detection needs credentials and the watermark:detect permission."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.crypto.keyring import KeyRing
from appliance.watermark.green import GreenList, score
from appliance.watermark.keys import WatermarkKeys
from tests.integration.conftest import Running, new_key
from tests.server import DEFAULT_MODEL, appliance

STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a "
                                     "bottle."}]
HUMAN_TEXTS = [json.__doc__, argparse.__doc__, subprocess.__doc__]
TOKENS = 150


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running]) -> Running:
    return start_server({"APPLIANCE_WATERMARK__ENABLED": "true", "APPLIANCE_CACHE__ENABLED": "false"})


@pytest.fixture(scope="module")
def vocab(model_file: Path) -> Iterator[Any]:
    """The default model's tokenizer alone (llama-cpp-python, vocab_only), to score texts here with any key."""
    from llama_cpp import Llama

    model = Llama(str(model_file), vocab_only=True, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def marked(box: Running) -> str:
    reply = box.client().chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=TOKENS,  # type: ignore[arg-type]
                                                 temperature=0.8, seed=7)
    assert reply.usage is not None and reply.usage.completion_tokens >= 100, reply.usage
    return reply.choices[0].message.content or ""


def detect(box: Running, text: str, model: str = DEFAULT_MODEL, key: str | None = None,
           **body: Any) -> httpx.Response:
    return httpx.post(box.url + "/api/watermark/detect", headers={"Authorization": f"Bearer {key or box.key}"},
                      json={"model": model, "text": text, **body}, timeout=120)


def test_a_watermarked_answer_is_detected(box: Running, marked: str) -> None:
    answer = detect(box, marked)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["watermarked"] is True and result["z_score"] >= 4, result
    assert result["tokens_scored"] >= 80 and result["green_tokens"] > 0.4 * result["tokens_scored"]
    assert result["z_threshold"] == 4 and result["watermark_enabled"] is True


def test_the_same_model_without_the_watermark_and_human_text_are_not_detected(box: Running, model_file: Path
                                                                               ) -> None:
    from llama_cpp import Llama

    plain_model = Llama(str(model_file), n_ctx=512, seed=7, verbose=False)
    try:
        plain = plain_model.create_chat_completion(STORY, max_tokens=TOKENS, temperature=0.8,  # type: ignore[arg-type]
                                                   seed=7)["choices"][0]["message"]["content"]  # type: ignore[index]
    finally:
        plain_model.close()
    for text in [plain, *HUMAN_TEXTS]:
        assert text
        result = detect(box, text).json()
        assert result["watermarked"] is False and result["z_score"] < 4, (result, text[:80])
        assert result["tokens_scored"] >= 40


def test_only_the_right_key_finds_the_watermark(box: Running, marked: str, vocab: Any) -> None:
    assert box.process is not None
    keys = box.process.data_dir / "keys"
    right = WatermarkKeys(KeyRing(keys), keys / "wrapped").model_key(DEFAULT_MODEL)
    tokens = vocab.tokenize(marked.encode(), add_bos=False, special=False)
    mine = score(tokens, GreenList(right, 0, 0.25))
    assert mine.z_score == pytest.approx(detect(box, marked).json()["z_score"], abs=1e-3)
    for other in (bytes(32), WatermarkKeys(KeyRing(keys), keys / "elsewhere").model_key(DEFAULT_MODEL),
                  WatermarkKeys(KeyRing(keys), keys / "wrapped").model_key("another-model")):
        assert other != right
        assert score(tokens, GreenList(other, 0, 0.25)).z_score < 4


def test_greedy_decoding_keeps_working(box: Running) -> None:
    client = box.client()
    replies = [client.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=40,  # type: ignore[arg-type]
                                              temperature=0).choices[0].message.content for _ in range(2)]
    assert replies[0] and replies[0] == replies[1]
    assert detect(box, replies[0]).json()["tokens_scored"] > 15


def test_bad_input_is_a_4xx_in_the_openai_shape(box: Running) -> None:
    assert box.process is not None
    appliance("models", "add-remote", "wm-remote", "--url", "http://127.0.0.1:9/v1", "--upstream-model", "x",
              data_dir=box.process.data_dir)
    cases = [(detect(box, "some text", model="no-such-model"), 404, "model"),
             (detect(box, ""), 400, "text"),
             (detect(box, "   \n"), 400, "text"),
             (detect(box, "x" * 200_001), 400, "text"),
             (detect(box, "some text", model="wm-remote"), 400, "model"),
             (detect(box, "some text", temperature=1), 400, "temperature"),
             (httpx.post(box.url + "/api/watermark/detect", headers=box.headers, content=b"{"), 400, None)]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert cases[4][0].json()["error"]["code"] == "watermark_unsupported"


def test_detection_needs_credentials_and_its_permission(box: Running) -> None:
    assert box.process is not None
    assert httpx.post(box.url + "/api/watermark/detect", json={"model": DEFAULT_MODEL, "text": "hi"}).status_code == 401
    user = new_key(box.process.data_dir, role="user")
    assert detect(box, "hi", key=user).status_code == 403
    auditor = new_key(box.process.data_dir, role="auditor")
    assert detect(box, "Hello there, how are you?", key=auditor).status_code == 200
