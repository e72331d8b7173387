"""The batching scheduler in-process with the real model: per-request sampling, stops, grammars, cancellation,
prefix reuse. Requests run side by side in one scheduler, as the worker runs them."""

from __future__ import annotations

import json
import queue
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.engines.llamacpp_runtime import LlamaRuntime, Piece
from appliance.engines.llamacpp_sampling import (
    InvalidSampling,
    SamplerChain,
    SamplingParams,
    grammar_for,
    sampling_from,
)
from appliance.engines.llamacpp_scheduler import Job, Scheduler, common_prefix
from appliance.registry.sources import open_source, parse_source
from tests.server import DEFAULT_MODEL

NO_EOS = {0: -100.0, 2: -100.0}


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model as a plain GGUF, fetched from its catalog source (the store keeps it encrypted)."""
    catalog = tomllib.loads((Path(__file__).parents[2] / "models" / "catalog.toml").read_text())
    target = tmp_path_factory.mktemp("gguf") / "model.gguf"
    with open_source(parse_source(catalog["models"][DEFAULT_MODEL]["source"])) as download, target.open("wb") as fh:
        for block in download:
            fh.write(block)
    return target


@pytest.fixture(scope="module")
def scheduler(gguf: Path) -> Iterator[Scheduler]:
    runtime = LlamaRuntime(str(gguf), n_ctx=512, n_threads=1, n_batch=32, n_gpu_layers=0, flash_attn=True,
                           parallel=3)
    scheduler = Scheduler(runtime)
    scheduler.start()
    yield scheduler
    scheduler.stop()
    runtime.close()


class Request:
    """A submitted job and the pieces it has received."""

    def __init__(self, scheduler: Scheduler, prompt: str, leader: Job | None = None, submit: bool = True,
                 **params: object) -> None:
        self.items: queue.Queue[Piece | BaseException] = queue.Queue()
        tokens = scheduler.runtime.tokenize(prompt, is_chat=False)
        sampling = SamplingParams(**params)  # type: ignore[arg-type]
        self.job = Job(tokens, sampling, self.items.put, sampling.max_tokens or 64, leader=leader)
        if submit:
            scheduler.submit(self.job)

    def next(self) -> Piece:
        item = self.items.get(timeout=300)
        if isinstance(item, BaseException):
            raise item
        return item

    def result(self) -> tuple[str, str]:
        parts = []
        while True:
            piece = self.next()
            parts.append(piece.text)
            if piece.finish_reason:
                return "".join(parts), piece.finish_reason


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_sampling_from_openai_fields() -> None:
    params = sampling_from({"temperature": 0, "max_tokens": 5, "stop": "x", "logit_bias": {"7": -100},
                            "top_p": None, "seed": 3, "frequency_penalty": 0.5})
    assert (params.temperature, params.max_tokens, params.stop, params.logit_bias) == (0, 5, ["x"], {7: -100.0})
    assert params.top_p == 1.0 and params.seed == 3 and params.penalised
    assert params.grammar is None


def test_response_formats_become_grammars() -> None:
    assert grammar_for(None) is None and grammar_for({"type": "text"}) is None
    assert "root" in (grammar_for({"type": "json_object"}) or "")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert "root" in (grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) or "")
    with pytest.raises(InvalidSampling) as info:
        grammar_for({"type": "json_schema", "json_schema": {"name": "x"}})
    assert info.value.param == "response_format"


def test_side_by_side_greedy_requests_get_their_solo_text(scheduler: Scheduler) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    solo = [Request(scheduler, p, temperature=0, max_tokens=24, logit_bias=NO_EOS).result() for p in prompts]
    together = [Request(scheduler, p, temperature=0, max_tokens=24, logit_bias=NO_EOS) for p in prompts]
    assert [r.result() for r in together] == solo
    assert all(reason == "length" for _, reason in solo)


def test_same_seed_same_text_different_seed_different_text(scheduler: Scheduler) -> None:
    def sample(seed: int) -> Request:
        return Request(scheduler, "My favourite animal is", temperature=1.2, top_k=0, min_p=0.0, seed=seed,
                       max_tokens=24, logit_bias=NO_EOS)

    runs = [sample(1), sample(1), sample(2)]  # all three share the batch
    first, again, other = (r.result()[0] for r in runs)
    assert first == again
    assert first != other


def test_stop_string_and_logit_bias(scheduler: Scheduler) -> None:
    text, reason = Request(scheduler, "Count: 1, 2, 3, 4,", temperature=0, max_tokens=40, stop=[" 7"],
                           logit_bias=NO_EOS).result()
    assert reason == "stop" and " 7" not in text and text.strip().startswith("5")
    banned = scheduler.runtime.tokenize(" 5", is_chat=False)[-1]
    text, _ = Request(scheduler, "Count: 1, 2, 3, 4,", temperature=0, max_tokens=3,
                      logit_bias={**NO_EOS, banned: -100.0}).result()
    assert not text.startswith(" 5")


def test_json_schema_grammar_constrains_the_output(scheduler: Scheduler) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    text, reason = Request(scheduler, "Weather report as JSON:", temperature=0, max_tokens=120,
                           grammar=grammar).result()
    assert reason == "stop", text
    value = json.loads(text)
    assert set(value) == {"city", "sunny"} and isinstance(value["sunny"], bool)


def test_cancelled_request_frees_its_slot_and_a_queued_one_never_starts(scheduler: Scheduler) -> None:
    before = scheduler.stats()
    running = [Request(scheduler, f"Tell a long story number {i}", temperature=0, max_tokens=400,
                       logit_bias=NO_EOS) for i in range(3)]
    queued = Request(scheduler, "This one waits", temperature=0, max_tokens=400, logit_bias=NO_EOS)
    for request in running:
        request.next()  # all three slots are generating; the fourth waits
    scheduler.cancel(queued.job)
    for request in running:
        scheduler.cancel(request.job)
    for request in [*running, queued]:
        assert request.result()[1] == "cancelled"
    after = scheduler.stats()
    assert after["active_sequences"] == 0 and after["queued"] == 0
    assert after["cancelled"] - before["cancelled"] == 4
    assert after["generated_tokens"] - before["generated_tokens"] < 3 * 400


def test_prompt_prefix_is_reused_from_the_cache(scheduler: Scheduler) -> None:
    prompt = "A shared system prompt that is long enough to be worth keeping in the cache. " * 4
    first = Request(scheduler, prompt + "Question one?", temperature=0, max_tokens=2)
    first.result()
    second = Request(scheduler, prompt + "Question two?", temperature=0, max_tokens=2)
    second.result()
    shared = common_prefix(first.job.tokens, second.job.tokens)
    assert second.job.usage.cached_tokens == shared > 40
    assert second.job.usage.prompt_tokens == len(second.job.tokens)


def test_greedy_fast_path_picks_the_chains_token(gguf: Path) -> None:
    """Plain greedy decoding skips the sampler chain: on real logits rows it must pick what the chain would,
    logit bias included (banning each row's favourite moves both to the same runner-up)."""
    runtime = LlamaRuntime(str(gguf), n_ctx=128, n_threads=1, n_batch=32, n_gpu_layers=0, flash_attn=True)
    try:
        tokens = runtime.tokenize("The quick brown fox jumps over the lazy dog because", is_chat=False)
        for i, token in enumerate(tokens):
            Scheduler._put(runtime.batch, i, token, i, 0, True)
        assert runtime.decode(len(tokens)) == 0

        def both(bias: dict[int, float]) -> list[tuple[int, int]]:
            params = SamplingParams(temperature=0, logit_bias=bias)
            chain = SamplerChain(params, runtime.vocab, runtime.n_vocab, 0, fast=False)
            fast = SamplerChain(params, runtime.vocab, runtime.n_vocab, 0)
            assert fast.greedy and not chain.greedy
            try:
                return [(chain.sample(runtime.ctx, i), fast.sample(runtime.ctx, i)) for i in range(len(tokens))]
            finally:
                chain.close()
                fast.close()

        plain = both({})  # no bias: the rows stay as decoded for the next pass
        assert all(a == b for a, b in plain) and len({a for a, _ in plain}) > 3
        banned = both({plain[-1][0]: -100.0, **NO_EOS})
        assert all(a == b for a, b in banned) and banned[-1][0] != plain[-1][0]
        assert both({}) == plain  # the bias went on copies: the rows stay raw for logprobs and other choices
    finally:
        runtime.close()


def test_stream_interval_hands_text_over_in_fewer_pieces(scheduler: Scheduler) -> None:
    """With a stream interval the first text comes at once and the rest with the finish reason; the text is the
    same as token by token."""
    prompt = "List the planets of the solar system:"
    pieces_at_once: list[Piece] = []
    request = Request(scheduler, prompt, temperature=0, max_tokens=16, logit_bias=NO_EOS)
    while not pieces_at_once or not pieces_at_once[-1].finish_reason:
        pieces_at_once.append(request.next())
    scheduler.stream_interval = 3600.0
    try:
        request = Request(scheduler, prompt, temperature=0, max_tokens=16, logit_bias=NO_EOS)
        first, last = request.next(), request.next()
    finally:
        scheduler.stream_interval = 0.0
    assert len(pieces_at_once) > 8
    assert first.text and first.finish_reason is None and last.finish_reason == "length"
    assert first.text + last.text == "".join(p.text for p in pieces_at_once)


def test_a_burst_from_idle_shares_the_first_step(scheduler: Scheduler) -> None:
    """Requests arriving together at an idle scheduler are prefilled in one step, not the first alone while the
    others wait behind it: three short prompts of two tokens each take two steps in all."""
    assert scheduler.active == 0
    before = scheduler.stats()["steps"]
    burst = [Request(scheduler, prompt, temperature=0, max_tokens=2, logit_bias=NO_EOS)
             for prompt in ("Red", "Green", "Blue")]
    assert all(r.result()[1] == "length" for r in burst)
    assert sum(len(r.job.tokens) for r in burst) <= scheduler.runtime.n_batch
    assert scheduler.stats()["steps"] - before == 2


def choices(scheduler: Scheduler, prompt: str, n: int, **params: object) -> list[Request]:
    """The n choices of one request, submitted together with the first leading, as the worker does."""
    first = Request(scheduler, prompt, submit=False, **params)
    requests = [first, *(Request(scheduler, prompt, leader=first.job, submit=False, **params) for _ in range(n - 1))]
    scheduler.submit(*(r.job for r in requests))
    return requests


PROMPT = "A long shared instruction that every choice of the request starts from, repeated to be long. " * 3


def test_choices_copy_the_leaders_prompt_and_decode_the_same_as_alone(scheduler: Scheduler) -> None:
    solo = Request(scheduler, PROMPT, temperature=0, max_tokens=12, logit_bias=NO_EOS).result()
    before = scheduler.stats()["copied_prompt_tokens"]
    three = choices(scheduler, PROMPT, 3, temperature=0, max_tokens=12, logit_bias=NO_EOS, logprobs=2)
    assert [r.result() for r in three] == [solo] * 3
    assert scheduler.stats()["copied_prompt_tokens"] - before == 2 * len(three[0].job.tokens)
    assert [r.job.usage.completion_tokens for r in three] == [12] * 3


def test_choices_of_a_leader_cancelled_before_its_prompt_compute_the_prompt_themselves(scheduler: Scheduler) -> None:
    solo = Request(scheduler, PROMPT + "Again.", temperature=0, max_tokens=6, logit_bias=NO_EOS).result()
    first = Request(scheduler, PROMPT + "Again.", submit=False, temperature=0, max_tokens=6, logit_bias=NO_EOS)
    first.job.cancel()  # gone before the scheduler sees it: the others must not wait for its prompt
    rest = [Request(scheduler, PROMPT + "Again.", leader=first.job, submit=False, temperature=0, max_tokens=6,
                    logit_bias=NO_EOS) for _ in range(2)]
    scheduler.submit(first.job, *(r.job for r in rest))
    assert first.result()[1] == "cancelled"
    assert [r.result() for r in rest] == [solo] * 2


def test_logprob_entries_come_with_the_text_one_per_token(scheduler: Scheduler) -> None:
    request = Request(scheduler, "The capital of France is", temperature=0, max_tokens=10, logprobs=4)
    pieces = []  # no logit_bias: greedy must take the arg-max of the very distribution shown
    while not pieces or not pieces[-1].finish_reason:
        pieces.append(request.next())
    entries = [e for p in pieces for e in p.logprobs or []]
    assert len(entries) == request.job.usage.completion_tokens > 0
    assert b"".join(e.token for e in entries).decode() == "".join(p.text for p in pieces)
    assert all(len(e.top) == 4 and e.top[0] == (e.token, e.logprob) for e in entries)
    plain = Request(scheduler, "The capital of France is", temperature=0, max_tokens=2)
    assert plain.next().logprobs is None


SOURCES = ("[1] The Appliance stores every model encrypted with AES-256-GCM in segments of 64 KiB; a per-file key is "
           "derived with HKDF from a random data key.\n[2] The master key lives in keys/master.key with mode 0600 and "
           "wraps each data key; rotating it re-wraps the data keys without re-encrypting the weights.\n[3] At load "
           "time the weights are decrypted into a sealed memfd and never written to persistent disk.")
RAG_MESSAGES = [{"role": "system", "content": "Answer using only the sources. Quote the sentences you use word for "
                 "word, with their number."},
                {"role": "user", "content": SOURCES + "\n\nQuestion: How are models stored? Quote the sources word for "
                 "word."}]


def test_prompt_lookup_drafts_keep_the_text_and_save_steps(gguf: Path) -> None:
    """A RAG answer that quotes its sources: with prompt-lookup drafts the text is the one decoding token by token
    gives (greedy, and sampled with a seed), drafted tokens are accepted, and the answer takes fewer steps."""
    runtime = LlamaRuntime(str(gguf), n_ctx=1024, n_threads=1, n_batch=512, n_gpu_layers=0, flash_attn=True)
    prompt = runtime.tokenize(runtime.chat_prompt(RAG_MESSAGES), is_chat=True)
    results: dict[tuple[int, float], tuple[str, dict[str, int]]] = {}
    try:
        for draft in (0, 8):
            scheduler = Scheduler(runtime, lookup_draft=draft)
            scheduler.start()
            try:
                for temperature in (0.0, 0.7):
                    runtime.forget(0, -1)
                    scheduler.slots[0].cached = []  # the prompt is computed afresh each time
                    items: queue.Queue[Piece | BaseException] = queue.Queue()
                    job = Job(list(prompt), SamplingParams(temperature=temperature, seed=7, max_tokens=96),
                              items.put, 96)
                    before = scheduler.stats()
                    scheduler.submit(job)
                    text = ""
                    while True:
                        item = items.get(timeout=300)
                        assert not isinstance(item, BaseException)
                        text += item.text
                        if item.finish_reason:
                            break
                    after = scheduler.stats()
                    results[draft, temperature] = text, {k: after[k] - before[k] for k in after}
            finally:
                scheduler.stop()
    finally:
        runtime.close()
    for temperature in (0.0, 0.7):
        (plain, plain_stats), (drafted, drafted_stats) = results[0, temperature], results[8, temperature]
        assert drafted == plain and len(plain) > 100
        assert plain_stats["accepted_draft_tokens"] == plain_stats["drafted_tokens"] == 0
        assert drafted_stats["generated_tokens"] == plain_stats["generated_tokens"]
    greedy = results[8, 0.0][1]
    assert "keys/master.key" in results[8, 0.0][0]  # the answer quotes its source
    assert greedy["accepted_draft_tokens"] >= 10
    assert greedy["steps"] <= results[0, 0.0][1]["steps"] - greedy["accepted_draft_tokens"] // 2


def test_a_busy_slots_prompt_prefix_is_copied_not_computed(scheduler: Scheduler) -> None:
    """Two chats with one long system prompt, the first still generating: the second copies the first's KV cells
    of the shared prefix into its own slot (prefix tokens reused) and writes what it writes when it computes all."""
    system = "You are the support assistant of the Appliance. Answer briefly, politely and only about it. " * 3
    solo = Request(scheduler, system + "Question: what is a slot?", temperature=0, max_tokens=12, logit_bias=NO_EOS)
    reference, _ = solo.result()
    running = Request(scheduler, system + "Question: what is a model?", temperature=0, max_tokens=400,
                      logit_bias=NO_EOS)
    running.next()  # it decodes now, in the slot that held the first chat (the longest common prefix)
    before = scheduler.stats()
    second = Request(scheduler, system + "Question: what is a slot?", temperature=0, max_tokens=12,
                     logit_bias=NO_EOS)
    text, _ = second.result()
    running.job.cancel()
    shared = common_prefix(running.job.tokens, second.job.tokens)
    assert shared > 60
    assert second.job.usage.cached_tokens == shared
    assert scheduler.stats()["shared_prompt_tokens"] - before["shared_prompt_tokens"] == shared
    assert text == reference
