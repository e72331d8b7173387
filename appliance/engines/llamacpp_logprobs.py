"""Log-probabilities of generated tokens for the llama.cpp worker, and their OpenAI shapes.

The numbers come from the model's raw distribution at each step: the log-softmax of the logits row that
`llama_get_logits_ith` returns, before logit_bias, penalties, grammar, temperature and top-k/top-p/min-p
truncation (vLLM's default `raw_logprobs`). So the chosen token's logprob is its probability under the model, the
alternatives are the model's most likely tokens, and a token that a bias or grammar forced may have a low logprob.
Computed only for requests that ask (`logprobs`): the per-token path of the others does not change."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions' logprobs, as OpenAI


@dataclass
class TokenLogprob:
    """One generated token: its bytes, its logprob, and the most likely alternatives (bytes, logprob), best first."""

    token: bytes
    logprob: float
    top: list[tuple[bytes, float]] = field(default_factory=list)


def log_softmax_top(logits: np.ndarray[Any, Any], token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The logprob of `token` and the `top` most likely tokens (id, logprob), best first, from one logits row.
    The row is read, never written (several sequences may share it)."""
    peak = float(logits.max())
    log_sum = peak + math.log(float(np.exp(logits - peak).sum(dtype=np.float64)))
    chosen = float(logits[token]) - log_sum
    if top <= 0:
        return chosen, []
    best = np.argpartition(logits, -top)[-top:]
    best = best[np.lexsort((best, -logits[best]))]  # best first; equal logits: the lower id first, as greedy
    return chosen, [(int(i), float(logits[i]) - log_sum) for i in best]


def token_logprob(ctx: Any, index: int, n_vocab: int, token: int, top: int,
                  piece: Callable[[int], bytes]) -> TokenLogprob:
    """The entry for `token`, sampled from batch entry `index`; `piece` gives a token's bytes."""
    row = llama_cpp.llama_get_logits_ith(ctx, index)
    if not row:
        raise RuntimeError(f"llama.cpp has no logits for batch entry {index}")
    chosen, alternatives = log_softmax_top(np.ctypeslib.as_array(row, shape=(n_vocab,)), token, top)
    return TokenLogprob(piece(token), chosen, [(piece(i), lp) for i, lp in alternatives])


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's `logprobs`: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    return {"content": [
        {"token": _text(e.token), "logprob": e.logprob, "bytes": list(e.token),
         "top_logprobs": [{"token": _text(t), "logprob": lp, "bytes": list(t)} for t, lp in e.top]}
        for e in entries]}


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """A completion choice's legacy `logprobs`: parallel lists, `text_offset` counting characters of the
    completion from `offset` (where this chunk's text starts). Each `top_logprobs` dict holds the alternatives and
    the chosen token, as OpenAI's does."""
    tokens, offsets, tops = [], [], []
    for e in entries:
        text = _text(e.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top = {_text(t): lp for t, lp in e.top}
        if e.top:
            top.setdefault(text, e.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def requested(body: dict[str, Any]) -> int | None:
    """How many alternatives a request asks for per token, or None when it asks for no logprobs: chat's
    `logprobs: true` with `top_logprobs` (0-20), or the completions' `logprobs: N` (0-5). ValueError(message,
    param) for a value out of range."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if isinstance(logprobs, bool) or logprobs is None:  # chat
        if top is not None and not logprobs:
            raise ValueError("top_logprobs needs logprobs: true", "top_logprobs")
        if not logprobs:
            return None
        if top is None:
            return 0
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
        return top
    if not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ValueError(f"logprobs must be true or false (chat) or an integer from 0 to {MAX_COMPLETION_LOGPROBS} "
                         "(completions)", "logprobs")
    return logprobs
