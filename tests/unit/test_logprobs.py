"""The pure parts of the worker's logprobs: log-softmax over a logits row, the OpenAI shapes, the request fields."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from appliance.engines.llamacpp_logprobs import (
    TokenLogprob,
    chat_logprobs,
    completion_logprobs,
    log_softmax_top,
    requested,
)


def test_log_softmax_matches_the_definition_and_leaves_the_row_alone() -> None:
    rng = np.random.default_rng(7)
    row = rng.normal(0, 4, size=49152).astype(np.float32)
    before = row.copy()
    chosen, top = log_softmax_top(row, 123, 5)
    log_z = math.log(sum(math.exp(float(x)) for x in row.astype(np.float64)))
    assert chosen == pytest.approx(float(row[123]) - log_z, abs=1e-4)
    assert [i for i, _ in top] == list(np.argsort(-row)[:5])  # best first
    assert all(a >= b for (_, a), (_, b) in itertools.pairwise(top))
    assert sum(math.exp(lp) for _, lp in top) <= 1.0
    assert np.array_equal(row, before)
    assert log_softmax_top(row, 0, 0)[1] == []


def test_the_arg_max_has_the_highest_logprob() -> None:
    row = np.array([0.0, 3.0, 1.0, 3.0], dtype=np.float32)
    chosen, top = log_softmax_top(row, 1, 4)
    assert top[0] == (1, chosen) and top[1][0] == 3  # ties keep the lower id first, as greedy picks it
    assert sum(math.exp(lp) for _, lp in top) == pytest.approx(1.0)


ENTRIES = [TokenLogprob(b" Paris", -0.25, [(b" Paris", -0.25), (b" the", -2.5)]),
           TokenLogprob(b"\xc3", -1.0, [(b"\xc3", -1.0)]),
           TokenLogprob(b".", -0.5, [(b",", -0.4), (b"!", -2.0)])]


def test_chat_shape() -> None:
    content = chat_logprobs(ENTRIES)["content"]
    assert content[0] == {"token": " Paris", "logprob": -0.25, "bytes": list(b" Paris"),
                          "top_logprobs": [{"token": " Paris", "logprob": -0.25, "bytes": list(b" Paris")},
                                           {"token": " the", "logprob": -2.5, "bytes": list(b" the")}]}
    assert content[1]["bytes"] == [0xC3] and content[1]["token"] == "\ufffd"  # half a character: bytes tell


def test_legacy_completion_shape() -> None:
    out = completion_logprobs(ENTRIES, offset=10)
    assert out["tokens"] == [" Paris", "\ufffd", "."]
    assert out["token_logprobs"] == [-0.25, -1.0, -0.5]
    assert out["text_offset"] == [10, 16, 17]
    assert out["top_logprobs"][2] == {",": -0.4, "!": -2.0, ".": -0.5}  # the chosen token is always there


@pytest.mark.parametrize(("body", "wanted"), [
    ({}, None), ({"logprobs": False}, None), ({"logprobs": True}, 0), ({"logprobs": True, "top_logprobs": 20}, 20),
    ({"logprobs": 0}, 0), ({"logprobs": 5}, 5),
])
def test_requested(body: dict[str, object], wanted: int | None) -> None:
    assert requested(body) == wanted


@pytest.mark.parametrize(("body", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": False, "top_logprobs": 1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"logprobs": 6}, "logprobs"),
    ({"logprobs": -1}, "logprobs"), ({"logprobs": "yes"}, "logprobs"),
])
def test_requested_refuses_out_of_range(body: dict[str, object], param: str) -> None:
    with pytest.raises(ValueError, match=param) as info:
        requested(body)
    assert info.value.args[1] == param
