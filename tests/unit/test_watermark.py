"""The watermark's green lists, z-score, key and detection body: the sampler's vectorised masks and the detector's
per-pair test agree; about gamma of the vocabulary is green, a different part after each token and under each key;
random text scores like the null hypothesis; repeated pairs count once; the secret survives a key rotation."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import numpy as np
import pytest

from appliance.config import WatermarkSettings
from appliance.crypto.keyring import KeyRing
from appliance.errors import InvalidRequest
from appliance.registry.service import ModelRecord
from appliance.watermark.green import GreenList, Score, Watermark, score, z_score
from appliance.watermark.keys import WatermarkKeys
from appliance.watermark.service import WatermarkService, WatermarkUnsupported

VOCAB = 49152  # SmolLM2's
KEY = bytes(range(32))


def test_the_samplers_mask_and_the_detectors_test_agree() -> None:
    green = GreenList(KEY, VOCAB, 0.25)
    for prev in (0, 1, 17, 4242, VOCAB - 1):
        mask = green.mask(prev)
        assert mask.shape == (VOCAB,) and mask.dtype == np.bool_
        for token in [*range(0, VOCAB, 1013), VOCAB - 1]:
            assert bool(mask[token]) == green.is_green(prev, token), (prev, token)


@pytest.mark.parametrize("gamma", [0.1, 0.25, 0.5])
def test_about_gamma_of_the_vocabulary_is_green_and_it_changes_with_the_token_and_the_key(gamma: float) -> None:
    green, other_key = GreenList(KEY, VOCAB, gamma), GreenList(os.urandom(32), VOCAB, gamma)
    a, b, c = green.mask(100), green.mask(101), other_key.mask(100)
    sd = (VOCAB * gamma * (1 - gamma)) ** 0.5
    for mask in (a, b, c):
        assert abs(int(mask.sum()) - gamma * VOCAB) < 5 * sd
    for left, right in ((a, b), (a, c)):  # independent lists overlap by about gamma**2 of the vocabulary
        assert abs(int((left & right).sum()) - gamma * gamma * VOCAB) < 5 * sd


def test_masks_are_cached_per_previous_token_and_evicted_oldest_first() -> None:
    green = GreenList(KEY, 1000, 0.25, cache=2)
    first = green.mask(1)
    assert green.mask(1) is first and (green.hits, green.misses) == (1, 1)
    green.mask(2)
    green.mask(3)  # evicts 1
    again = green.mask(1)
    assert again is not first and np.array_equal(again, first) and green.misses == 4


def test_the_watermark_adds_delta_to_green_logits_on_a_copy() -> None:
    green = GreenList(KEY, VOCAB, 0.25)
    logits = np.random.default_rng(0).standard_normal(VOCAB).astype(np.float32)
    raw = logits.copy()
    biased = Watermark(green, 2.0).apply(logits, 7)
    assert np.array_equal(logits, raw)  # the row itself serves logprobs and other choices
    mask = green.mask(7)
    assert np.allclose(biased[mask], raw[mask] + 2.0) and np.array_equal(biased[~mask], raw[~mask])
    assert biased.dtype == np.float32


def test_z_score_is_the_binomial_standard_score() -> None:
    assert z_score(25, 100, 0.25) == 0.0
    assert z_score(100, 100, 0.25) == pytest.approx(75 / (100 * 0.25 * 0.75) ** 0.5)
    assert z_score(0, 0, 0.25) == 0.0
    assert not Score(0.0, 0, 0).watermarked() and Score(4.0, 50, 30).watermarked()
    assert not Score(3.99, 50, 30).watermarked() and Score(3.5, 50, 30).watermarked(threshold=3.0)


def test_text_without_the_watermark_scores_like_chance() -> None:
    green = GreenList(KEY, VOCAB, 0.25)
    rng = random.Random(1)
    zs = [score([rng.randrange(VOCAB) for _ in range(200)], green).z_score for _ in range(300)]
    assert abs(float(np.mean(zs))) < 0.25 and 0.8 < float(np.std(zs)) < 1.2
    assert max(zs) < 4.0


def test_a_walk_through_green_tokens_is_detected_and_repeats_count_once() -> None:
    green = GreenList(KEY, VOCAB, 0.25)
    rng = np.random.default_rng(2)
    tokens = [5]
    for _ in range(60):
        tokens.append(int(rng.choice(np.flatnonzero(green.mask(tokens[-1])))))  # always a green one
    result = score(tokens, green)
    assert result.green == result.scored == 60 and result.watermarked() and result.z_score > 12
    pair = next(t for t in range(VOCAB) if green.is_green(9, t) and green.is_green(t, 9))
    repeated = score([9, pair] * 200, green)  # one pair each way, however often: two scored
    assert (repeated.scored, repeated.green) == (2, 2) and not repeated.watermarked()


def test_the_secret_is_made_once_and_survives_a_key_rotation(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    keys = WatermarkKeys(ring, tmp_path / "keys" / "wrapped")
    assert keys.key_version() is None
    key = keys.model_key("m")
    assert len(key) == 32 and keys.key_version() == 1 and keys.model_key("other") != key
    assert (tmp_path / "keys" / "wrapped" / "watermark.key").stat().st_mode & 0o777 == 0o600
    assert not keys.rewrap()  # already under the active version
    ring.create_version()
    assert keys.rewrap() and keys.key_version() == 2
    ring.retire(1)
    reopened = WatermarkKeys(KeyRing(tmp_path / "keys"), tmp_path / "keys" / "wrapped")
    assert reopened.model_key("m") == key


def service(tmp_path: Path, **settings: object) -> WatermarkService:
    return WatermarkService(WatermarkSettings(**settings),  # type: ignore[arg-type]
                            WatermarkKeys(KeyRing(tmp_path / "keys"), tmp_path / "keys" / "wrapped"))


def record(name: str, fmt: str) -> ModelRecord:
    return ModelRecord(name, "file:x", fmt, "0" * 64, 1, "MIT", "2026-01-01")


def test_workers_get_the_key_only_for_watermarked_models_of_local_engines(tmp_path: Path) -> None:
    by_list = service(tmp_path, models=["a"])
    assert by_list.worker_config(record("a", "gguf")) is not None
    assert by_list.worker_config(record("b", "gguf")) is None
    everyone = service(tmp_path, enabled=True, gamma=0.5, delta=3.0)
    config = everyone.worker_config(record("b", "gguf"))
    assert config is not None and b'"gamma":0.5' in config and b'"delta":3.0' in config
    assert everyone.worker_config(record("b", "hf")) == config  # vLLM's logits processor gets the same
    assert everyone.worker_config(record("r", "remote")) is None


@pytest.mark.parametrize(("body", "param", "code"), [
    (b"not json", None, "invalid_body"),
    (b'{"model": "m"}', "text", "invalid_body"),
    (b'{"text": "hello"}', "model", "invalid_body"),
    (b'{"model": "m", "text": 3}', "text", "invalid_body"),
    (b'{"model": "m", "text": "  \\n"}', "text", "empty_text"),
    (b'{"model": "", "text": "hello"}', "model", "invalid_value"),
    (b'{"model": "m", "text": "x", "extra": 1}', "extra", "invalid_body"),
])
def test_bad_detection_bodies_are_400s_naming_the_field(tmp_path: Path, body: bytes, param: str | None,
                                                         code: str) -> None:
    async def never(*_: object) -> list[int]:
        raise AssertionError("not reached")

    with pytest.raises(InvalidRequest) as raised:
        asyncio.run(service(tmp_path).detect(body, None, lambda *_: record("m", "gguf"), never))
    assert (raised.value.param, raised.value.code, raised.value.status_code) == (param, code, 400)


def test_remote_models_cannot_be_tested(tmp_path: Path) -> None:
    async def never(*_: object) -> list[int]:
        raise AssertionError("not reached")

    with pytest.raises(WatermarkUnsupported) as raised:
        asyncio.run(service(tmp_path).detect(b'{"model": "m", "text": "hello"}', None,
                                             lambda *_: record("m", "remote"), never))
    assert raised.value.status_code == 400 and raised.value.param == "model"
