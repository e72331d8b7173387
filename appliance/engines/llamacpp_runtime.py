"""The llama.cpp model inside a worker process: prompt building, context checks and the generation loop.

One sequence at a time (the batching scheduler replaces `generate`). Runs in the worker process only."""

from __future__ import annotations

import codecs
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import LogitsProcessorList

from appliance.engines.chat_template import ChatTemplate


class ContextLengthExceeded(Exception):
    def __init__(self, n_ctx: int, prompt_tokens: int, max_tokens: int | None, what: str = "messages") -> None:
        requested = prompt_tokens + (max_tokens or 0)
        detail = (f"you requested {requested} tokens ({prompt_tokens} in the {what}, {max_tokens} in the "
                  "completion)" if max_tokens else f"your {what} resulted in {prompt_tokens} tokens")
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens. However, {detail}. "
            "Please reduce the length of the messages or the completion."
        )


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class Piece:
    """A slice of generated text; `finish_reason` is set on the last one."""

    text: str
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


class StopMatcher:
    """Holds back text that could be the start of a stop string, and cuts at a full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class LlamaRuntime:
    def __init__(self, model_path: str, *, n_ctx: int, n_threads: int, n_batch: int, n_gpu_layers: int,
                 flash_attn: bool) -> None:
        from llama_cpp import Llama

        if not n_ctx:  # the trained length, capped so that large models do not allocate a huge KV cache
            vocab = Llama(model_path=model_path, vocab_only=True, verbose=False)
            arch = vocab.metadata.get("general.architecture", "")
            n_ctx = min(int(vocab.metadata.get(f"{arch}.context_length", 4096)), 8192)
            del vocab
        self.llm = Llama(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                         n_batch=n_batch, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, verbose=False)
        self.n_ctx = self.llm.n_ctx()
        self._vocab = self.llm._model.vocab
        meta = self.llm.metadata
        self.template = ChatTemplate(meta.get("tokenizer.chat_template"), self._token_text(self.llm.token_bos()),
                                     self._token_text(self.llm.token_eos()))
        self.lock = threading.Lock()
        self.generated_tokens = 0
        self.cancelled = 0

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return self.template.render(messages)

    def tokenize(self, text: str, *, is_chat: bool) -> list[int]:
        # A rendered chat template carries its own BOS text; plain completions get the model's BOS.
        tokens: list[int] = self.llm.tokenize(text.encode("utf-8"), add_bos=not is_chat, special=is_chat)
        return tokens

    def check_context(self, prompt_tokens: int, max_tokens: int | None, what: str = "messages") -> int:
        """The number of tokens that may be generated; raises when the request cannot fit."""
        if prompt_tokens >= self.n_ctx or (max_tokens and prompt_tokens + max_tokens > self.n_ctx):
            raise ContextLengthExceeded(self.n_ctx, prompt_tokens, max_tokens, what)
        return max_tokens or self.n_ctx - prompt_tokens

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def generate(self, tokens: list[int], params: SamplingParams, cancel: threading.Event,
                 usage: Usage) -> Iterator[Piece]:
        """Stream text pieces; stops on end-of-generation, a stop string, max_tokens or `cancel`."""
        limit = self.check_context(len(tokens), params.max_tokens)
        usage.prompt_tokens = len(tokens)
        with self.lock:
            self.llm.set_seed(params.seed if params.seed is not None else secrets.randbits(32))
            yield from self._generate_locked(tokens, params, limit, cancel, usage)

    def _generate_locked(self, tokens: list[int], params: SamplingParams, limit: int, cancel: threading.Event,
                         usage: Usage) -> Iterator[Piece]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        processors = LogitsProcessorList([_logit_bias(params.logit_bias)]) if params.logit_bias else None
        finish = "length"
        for token in self.llm.generate(
            tokens, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, temp=params.temperature,
            repeat_penalty=params.repeat_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, reset=True, logits_processor=processors,
        ):
            if cancel.is_set():
                self.cancelled += 1
                finish = "cancelled"
                break
            if self.is_end_of_generation(token):
                finish = "stop"
                break
            usage.completion_tokens += 1
            self.generated_tokens += 1
            text = decoder.decode(self.llm.detokenize([token]))
            out, stopped = stops.feed(text)
            if stopped:
                if out:
                    yield Piece(out)
                finish = "stop"
                break
            if out:
                yield Piece(out)
            if usage.completion_tokens >= limit:
                break
        if finish != "stop":
            tail = stops.flush() + decoder.decode(b"", final=True)
            if tail:
                yield Piece(tail)
        yield Piece("", finish)


def _logit_bias(bias: Mapping[int, float]) -> Any:
    ids = np.fromiter(bias.keys(), dtype=np.int64)
    values = np.fromiter(bias.values(), dtype=np.float32)

    def apply(_: Any, scores: Any) -> Any:
        valid = ids < scores.shape[-1]
        scores[ids[valid]] += values[valid]
        return scores

    return apply
