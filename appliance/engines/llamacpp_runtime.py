"""The llama.cpp model inside a worker process: the model and one context with a KV cache per sequence, prompt
building, tokenization and context checks. Runs in the worker process only; the scheduler drives the decoding."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp._internals import LlamaModel
from llama_cpp._logger import set_verbose

from appliance.config import UBATCH
from appliance.engines.chat_template import ChatTemplate
from appliance.engines.llamacpp_logprobs import TokenLogprob
from appliance.engines.tool_calls import ToolSet, ToolTraits, render_chat

MAX_DEFAULT_CTX = 8192  # per sequence, when the settings leave it to the model's trained length


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
class Piece:
    """A slice of generated text; `finish_reason` is set on the last one. `logprobs`: the entries of the tokens
    generated since the last piece, when the request asked for them."""

    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_text: str = ""  # the tool calls' text that followed `text` (appliance.engines.tool_calls)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused rather than computed


class StopMatcher:
    """Holds back text that could be the start of a stop string, and cuts at a full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.after = ""  # after a match: the text that followed the stop string

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(i, len(s)) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            at, length = min(hits)
            out, self.after = self.pending[:at], self.pending[at + length:]
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
    """One model and one llama.cpp context holding `parallel` sequences, each with its own `n_ctx` cells."""

    def __init__(self, model_path: str, *, n_ctx: int, n_threads: int, n_batch: int, n_gpu_layers: int,
                 flash_attn: bool, parallel: int = 1) -> None:
        llama_cpp.llama_backend_init()
        set_verbose(False)  # llama.cpp's own log lines: errors only
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        self.model = LlamaModel(path_model=model_path, params=model_params, verbose=False)
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        if not n_ctx:  # the trained length, capped so that large models do not allocate a huge KV cache
            n_ctx = min(self.model.n_ctx_train(), MAX_DEFAULT_CTX)
        n_batch = max(n_batch, parallel)  # a step holds one token of every generating sequence
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * parallel
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, UBATCH)  # llama.cpp computes a long batch in micro-batches, as llama-server
        params.n_seq_max = parallel
        params.kv_unified = False  # a KV buffer per sequence: attention never scans other sequences' cells
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        self.ctx: Any = llama_cpp.llama_init_from_model(self.model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens x {parallel} sequences; "
                               "lower llamacpp.n_ctx or llamacpp.parallel")
        self.memory: Any = llama_cpp.llama_get_memory(self.ctx)
        self.parallel = parallel
        self.n_batch = n_batch
        self.n_ctx = int(llama_cpp.llama_n_ctx_seq(self.ctx))
        meta = self.model.metadata()
        self.template = ChatTemplate(meta.get("tokenizer.chat_template"), self._token_text(self.model.token_bos()),
                                     self._token_text(self.model.token_eos()))
        self.tool_traits = ToolTraits.probe(self.template)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.model.token_to_piece(token, special=True).rstrip(b"\0").decode("utf-8", errors="replace")

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], tools: ToolSet | None = None) -> str:
        return render_chat(self.template, self.tool_traits, messages, tools)

    def tokenize(self, text: str, *, is_chat: bool) -> list[int]:
        # A rendered chat template carries its own BOS text; plain completions get the model's BOS.
        tokens: list[int] = self.model.tokenize(text.encode("utf-8"), add_bos=not is_chat, special=is_chat)
        return tokens

    def check_context(self, prompt_tokens: int, max_tokens: int | None, what: str = "messages") -> int:
        """The number of tokens that may be generated; raises when the request cannot fit."""
        if prompt_tokens >= self.n_ctx or (max_tokens and prompt_tokens + max_tokens > self.n_ctx):
            raise ContextLengthExceeded(self.n_ctx, prompt_tokens, max_tokens, what)
        return max_tokens or self.n_ctx - prompt_tokens

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def piece(self, token: int, buffer: ctypes.Array[ctypes.c_char]) -> bytes:
        """The bytes of one generated token (special tokens render as nothing, as in the OpenAI API)."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:n]

    def forget(self, seq_id: int, from_pos: int) -> bool:
        """Free the KV cells of `seq_id` from `from_pos` on (-1 frees them all); False if llama.cpp cannot."""
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, from_pos, -1))

    def copy_sequence(self, src: int, dst: int) -> None:
        """Make `dst` hold what `src` holds (n > 1 choices share their prompt's KV cache). With a KV buffer per
        sequence (kv_unified=False) llama.cpp copies whole buffers, replacing all of `dst`, on the next decode."""
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def draft_cost(self, extra: int = 4, repeats: int = 3) -> float:
        """What decoding `extra` more tokens of one sequence in a step costs per token, as a fraction of a one-token
        step, measured now on sequence 0 (its cells are freed after): ~0.05 where the weights' reads dominate (a
        GPU), ~0.7 on a CPU whose matrix kernels do not batch (each token its own dot products). The fastest of a
        few tries counts, so other load on the box does not inflate it."""
        base = self.model.token_bos() if self.model.token_bos() >= 0 else 0
        best = {1: float("inf"), 1 + extra: float("inf")}
        for _ in range(repeats):
            for n in best:
                for i in range(n):
                    self.batch.token[i], self.batch.pos[i], self.batch.n_seq_id[i] = base, i, 1
                    self.batch.seq_id[i][0], self.batch.logits[i] = 0, True
                started = time.perf_counter()
                status = self.decode(n)
                best[n] = min(best[n], time.perf_counter() - started)
                self.forget(0, -1)
                if status != 0:
                    return float("inf")
        return (best[1 + extra] - best[1]) / extra / best[1]

    def decode(self, n_tokens: int) -> int:
        self.batch.n_tokens = n_tokens
        return int(llama_cpp.llama_decode(self.ctx, self.batch))

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        self.model.close()  # type: ignore[no-untyped-call]
