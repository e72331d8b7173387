"""Continuous batching for the llama.cpp worker: one thread decodes every running sequence per `llama_decode`.

Each step puts one token of every decoding sequence into the batch, then fills what room is left with chunks of
waiting prompts, so a long prompt is processed a slice at a time between other streams' tokens. New requests join
between steps; a finished or cancelled one leaves at the next step and its slot takes new work. A slot keeps the
tokens its KV cache holds, so a request whose prompt starts the same way (a chat's next turn, a shared system
prompt) is placed there and only its new tail is computed. When another slot's cache, busy or not, shares a longer
prefix (many chats with one system prompt, each in its own slot), that slot's KV cells are copied
(`LlamaRuntime.copy_sequence`) and the cells after the shared prefix dropped, so the system prompt is computed once
rather than once per slot (`shared_prompt_tokens`). An idle scheduler waits a few milliseconds for the rest
of a burst of requests, so that their prompts are computed together in the first step.

What a step produced for every request is handed over at once (`deliver`), so the worker's event loop wakes once
per step, not once per token. With a stream interval, a request's text is handed over at most that often: the
first text at once, then whatever accumulated (a few tokens when one sequence runs alone and fast), which saves
the HTTP layers a write, a read and a wake-up per token that would otherwise take CPU from the decoding.

The n choices of one request (`n` > 1) are n jobs; the first leads. The others, when they get a slot at the same
time, do not compute the prompt: once the leader's prompt is decoded, its KV cells are copied to their sequences
(`LlamaRuntime.copy_sequence`) and they sample their first token from the leader's logits row. A choice that waits
for a slot runs as a job of its own later (its slot's cached prefix still saves most of the prompt).

A sequence decoding alone drafts tokens by prompt lookup (appliance.engines.llamacpp_lookup): the tokens that
followed the last few tokens where they occurred before in its prompt or output go into the step after its sampled
token, each with logits, and are kept while its own sampler picks them (`_verify`), so the output is the one
decoding without drafts gives, greedy or sampled; the rest of the draft's cells are freed. With other sequences in
the step the batch already uses the CPU, and drafts would only take from them.

A request asking for logprobs gets, with each piece of text, the entries of the tokens behind it
(appliance.engines.llamacpp_logprobs); for the others the per-token path is unchanged."""

from __future__ import annotations

import codecs
import collections
import ctypes
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.engines.llamacpp_logprobs import TokenLogprob, token_logprob
from appliance.engines.llamacpp_lookup import PromptLookup
from appliance.engines.llamacpp_runtime import LlamaRuntime, Piece, StopMatcher, Usage
from appliance.engines.llamacpp_sampling import SamplerChain, SamplingParams
from appliance.engines.tool_calls import TRIGGER, ToolPlan
from appliance.watermark.green import Watermark

GATHER_QUIET = 0.003  # seconds without a new request that end the gathering of a burst (see Scheduler._gather)
GATHER_MAX = 0.015
# a prompt prefix at least this much longer in another slot's cache than in its own is copied from there: copying
# moves the other slot's whole KV buffer (n_ctx cells), which costs about what computing a few dozen tokens does
SHARE_MIN = 32

Emit = Callable[[Piece | BaseException], None]
"""Told each piece of text in order (the last carries the finish reason), or the error that ended the request.
Called by `deliver`, or on the scheduler's thread without one (then it must only hand the item over)."""
Outbox = list[tuple["Job", Piece | BaseException]]
Deliver = Callable[[Outbox], None]
"""Takes what one pass of the loop produced, in order; called on the scheduler's thread, it must only hand the list
over (e.g. one `loop.call_soon_threadsafe`) for each job's `emit` to be called elsewhere."""


@dataclass(eq=False)
class Job:
    """One request: its prompt, how to sample, where its text goes. `cancel()` is safe from any thread."""

    tokens: list[int]
    params: SamplingParams
    emit: Emit
    limit: int  # most tokens it may generate
    tools: ToolPlan | None = None  # a chat offering tools: the text from TRIGGER on is its calls
    usage: Usage = field(default_factory=Usage)
    leader: Job | None = None  # another choice of the same request, whose prompt's KV cells this one may copy
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class Slot:
    """A sequence id of the context: what its KV cache holds, and the job using it, if any."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens at positions 0.. whose KV is in the cache
    last_used: float = 0.0
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to decode
    next_token: int | None = None  # sampled, not yet decoded
    sampler: SamplerChain | None = None
    stops: StopMatcher = field(default_factory=lambda: StopMatcher([]))
    text: Any = None  # incremental UTF-8 decoder
    held: str = ""  # text not yet handed over (stream interval)
    held_tool: str = ""  # tool-call text not yet handed over
    trigger: StopMatcher | None = None  # watches for TRIGGER while the job's output is content
    in_tools: bool = False  # TRIGGER was written: the rest of the output is tool calls
    handed: float = 0.0  # when text was last handed over; 0 = never for this job
    output_index: int = -1  # batch entry whose logits this slot samples from after the step
    followers: list[Slot] = field(default_factory=list)  # slots waiting to copy this one's prompt (n > 1)
    logprobs: list[TokenLogprob] | None = None  # entries not yet handed over; None: the job asked for none
    lookup: PromptLookup | None = None  # the job's tokens indexed for drafts (built when it first decodes alone)
    draft: list[int] = field(default_factory=list)  # drafted tokens in this step, after the sampled one


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Scheduler:
    def __init__(self, runtime: LlamaRuntime, deliver: Deliver | None = None, stream_interval: float = 0.0,
                 lookup_draft: int = 0, watermark: Watermark | None = None) -> None:
        self.runtime = runtime
        self.lookup_draft = lookup_draft  # most drafted tokens per step for a sequence decoding alone; 0 = none
        self.watermark = watermark  # applied to every request's sampling (appliance.watermark)
        self.deliver = deliver
        self.stream_interval = stream_interval  # seconds; 0 = every token's text as soon as it is decoded
        self.outbox: Outbox = []
        self.slots = [Slot(i) for i in range(runtime.parallel)]
        self.queue: collections.deque[Job] = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.generated_tokens = 0
        self.cancelled = 0
        self.reused_prompt_tokens = 0
        self.copied_prompt_tokens = 0
        self.shared_prompt_tokens = 0
        self.drafted_tokens = 0
        self.accepted_draft_tokens = 0
        self.steps = 0
        self._buffer = ctypes.create_string_buffer(64)
        self.thread = threading.Thread(target=self._run, name="llama-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    def submit(self, *jobs: Job) -> None:
        """Queue jobs; the choices of one request are submitted together, so that they are admitted together."""
        with self.wake:
            self.queue.extend(jobs)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job`; its slot is free for other work after the current step at the latest."""
        with self.wake:
            job.cancel()
            self.wake.notify()

    @property
    def active(self) -> int:
        return sum(slot.job is not None for slot in self.slots)

    def stats(self) -> dict[str, int]:
        return {"parallel": len(self.slots), "active_sequences": self.active, "queued": len(self.queue),
                "generated_tokens": self.generated_tokens, "cancelled": self.cancelled,
                "reused_prompt_tokens": self.reused_prompt_tokens,
                "copied_prompt_tokens": self.copied_prompt_tokens,
                "shared_prompt_tokens": self.shared_prompt_tokens, "drafted_tokens": self.drafted_tokens,
                "accepted_draft_tokens": self.accepted_draft_tokens, "lookup_draft": self.lookup_draft,
                "steps": self.steps}

    # ------------------------------------------------------------------ the loop (scheduler thread only)

    def _run(self) -> None:
        while True:
            with self.wake:
                idle = not any(s.job for s in self.slots)
                while not self.stopping and not self.queue and idle:
                    self.wake.wait()
                if self.stopping:
                    return
                if idle:
                    self._gather()
                self._admit()
            self._drop_cancelled()
            try:
                self._step()
            except Exception as exc:  # a failed decode ends the requests in it, not the worker
                for slot in self.slots:
                    if slot.job is not None:
                        self._release(slot, exc)
            self._hand_over()

    def _emit(self, job: Job, item: Piece | BaseException) -> None:
        self.outbox.append((job, item))

    def _hand_over(self) -> None:
        if not self.outbox:
            return
        out, self.outbox = self.outbox, []
        if self.deliver is not None:
            self.deliver(out)
            return
        for job, item in out:
            job.emit(item)

    def _gather(self) -> None:
        """Starting from idle, wait while requests keep arriving (each within GATHER_QUIET of the last, GATHER_MAX at
        most), so that a burst's prompts share the first step rather than all but the first waiting behind it.
        Called with `wake` held."""
        deadline = time.monotonic() + GATHER_MAX
        free = len(self.slots)
        while not self.stopping and len(self.queue) < free:
            seen = len(self.queue)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.wake.wait(min(GATHER_QUIET, left))
            if len(self.queue) == seen:
                return

    def _admit(self) -> None:
        """Move queued jobs into free slots: the slot whose cache shares the longest prefix, else the oldest."""
        while self.queue:
            job = self.queue[0]
            if job.cancelled:
                self.queue.popleft()
                self.cancelled += 1
                self._emit(job, Piece("", "cancelled"))
                continue
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            self.queue.popleft()
            slot = max(free, key=lambda s: (common_prefix(s.cached, job.tokens), -s.last_used))
            try:
                self._assign(slot, job)
            except Exception as exc:
                slot.job = None
                self._emit(job, exc)

    def _assign(self, slot: Slot, job: Job) -> None:
        leader = next((s for s in self.slots if job.leader is not None and s.job is job.leader), None)
        attached = leader is not None and bool(leader.pending)
        if attached:  # copies the leader's prompt once it is decoded
            keep = 0
            self.runtime.forget(slot.seq_id, -1)
        else:
            keep = min(common_prefix(slot.cached, job.tokens), len(job.tokens) - 1)  # decode >= 1 token for logits
            shared = self._share_prefix(slot, job, keep)
            if shared is not None:
                keep = shared
            elif not self.runtime.forget(slot.seq_id, keep):
                keep = 0
                self.runtime.forget(slot.seq_id, -1)
        slot.cached = job.tokens[:keep]
        slot.pending = [] if attached else job.tokens[keep:]
        slot.next_token = None
        slot.logprobs = [] if job.params.logprobs is not None else None
        seed = job.params.seed if job.params.seed is not None else secrets.randbits(32)
        slot.sampler = SamplerChain(job.params, self.runtime.vocab, self.runtime.n_vocab, seed,
                                    watermark=self.watermark)
        slot.sampler.accept_prompt(job.tokens)
        slot.stops = StopMatcher(job.params.stop)
        slot.text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.held = slot.held_tool = ""
        slot.trigger = StopMatcher([TRIGGER]) if job.tools is not None else None
        slot.in_tools = False
        slot.handed = 0.0
        slot.lookup = None
        slot.draft = []
        job.usage.prompt_tokens = len(job.tokens)
        job.usage.cached_tokens = keep
        self.reused_prompt_tokens += keep
        slot.job = job
        if leader is not None and attached:
            leader.followers.append(slot)

    def _share_prefix(self, slot: Slot, job: Job, own: int) -> int | None:
        """Copy the KV cells of the prompt prefix another slot holds, when it is SHARE_MIN tokens longer than the
        `own` prefix the slot holds; returns the prefix length the slot holds now (None: nothing copied)."""
        best, length = None, 0
        for other in self.slots:
            if other is not slot:
                n = min(common_prefix(other.cached, job.tokens), len(job.tokens) - 1)
                if n > length:
                    best, length = other, n
        if best is None or length < own + SHARE_MIN:
            return None
        self.runtime.copy_sequence(best.seq_id, slot.seq_id)
        if not self.runtime.forget(slot.seq_id, length):  # the donor's cells after the shared prefix
            self.runtime.forget(slot.seq_id, -1)
            return 0
        self.shared_prompt_tokens += length
        return length

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                self.cancelled += 1
                self._release(slot, Piece("", "cancelled"))

    def _step(self) -> None:
        n = self._put_decoding()
        n = self._put_prompts(n)
        if n == 0:
            return
        status = self.runtime.decode(n)
        self.steps += 1
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        now = time.monotonic()
        for slot in self.slots:
            if slot.job is not None and slot.output_index >= 0:
                slot.last_used = now
                if slot.followers:  # its prompt is decoded now: the other choices start from a copy
                    self._start_followers(slot, now)
                assert slot.sampler is not None
                if slot.draft:
                    self._verify(slot, now)
                else:
                    token = slot.sampler.sample(self.runtime.ctx, slot.output_index, slot.cached[-1])
                    self._take(slot, token, now, slot.output_index)

    def _put_decoding(self) -> int:
        """One token for every decoding sequence first (streams never wait on prompts), with a draft after it for
        a sequence decoding alone; returns the batch entries used."""
        batch = self.runtime.batch
        n = 0
        alone = self.lookup_draft > 0 and self._alone()
        for slot in self.slots:
            if slot.job is not None and slot.next_token is not None:
                self._put(batch, n, slot.next_token, len(slot.cached), slot.seq_id, True)
                slot.cached.append(slot.next_token)
                slot.next_token = None
                slot.output_index = n
                n += 1
                if alone:
                    slot.draft = self._draft(slot, self.runtime.n_batch - n)
                    for token in slot.draft:
                        self._put(batch, n, token, len(slot.cached), slot.seq_id, True)
                        slot.cached.append(token)
                        n += 1
            else:
                slot.output_index = -1
        return n

    def _put_prompts(self, n: int) -> int:
        """Then prompt chunks, oldest request first, as far as the batch has room after entry `n`."""
        batch = self.runtime.batch
        prefilling = sorted((s for s in self.slots if s.job is not None and s.pending),
                            key=lambda s: s.job.submitted if s.job else 0.0)
        for slot in prefilling:
            take = min(len(slot.pending), self.runtime.n_batch - n)
            if take <= 0:
                break
            start = len(slot.cached)
            for i in range(take):
                self._put(batch, n, slot.pending[i], start + i, slot.seq_id, False)
                n += 1
            slot.cached.extend(slot.pending[:take])
            del slot.pending[:take]
            if not slot.pending:
                batch.logits[n - 1] = 1
                slot.output_index = n - 1
        return n

    def _alone(self) -> bool:
        """One sequence decoding, no prompt being computed and none waiting: the step has CPU to spare for drafts."""
        running = [s for s in self.slots if s.job is not None]
        return len(running) == 1 and not running[0].pending and not running[0].followers and not self.queue

    def _draft(self, slot: Slot, room: int) -> list[int]:
        """Tokens to decode after the slot's sampled one: a prompt-lookup guess within the job's token limit and
        its context."""
        job = slot.job
        assert job is not None
        if slot.lookup is None:
            slot.lookup = PromptLookup(slot.cached, self.lookup_draft)
        else:
            slot.lookup.extend(slot.cached[len(slot.lookup.tokens):])
        room = min(room, job.limit - job.usage.completion_tokens - 1, self.runtime.n_ctx - len(slot.cached) - 1)
        return slot.lookup.draft(room)

    def _verify(self, slot: Slot, now: float) -> None:
        """Sample the rows of a step with a draft in order, as decoding token by token would: each row whose token
        is the next drafted one keeps it (its KV cells are already computed); the first other token ends the
        step's output and is decoded next. The cells of drafted tokens not kept are freed."""
        draft, slot.draft = slot.draft, []
        sampler, first = slot.sampler, slot.output_index
        assert sampler is not None
        kept = len(slot.cached) - len(draft)  # cells that hold the sequence so far; the draft's follow
        accepted = 0
        for i in range(len(draft) + 1):
            token = sampler.sample(self.runtime.ctx, first + i, slot.cached[kept - 1 + i])  # after draft[i - 1]
            self._take(slot, token, now, first + i)
            if i == len(draft) or token != draft[i]:
                break
            accepted += 1
            if slot.job is None:  # finished on a drafted token
                break
            slot.next_token = None  # its cells are in the cache already
        self.drafted_tokens += len(draft)
        self.accepted_draft_tokens += accepted
        if not accepted and slot.lookup is not None:
            slot.lookup.missed()
        del slot.cached[kept + accepted:]
        if not self.runtime.forget(slot.seq_id, kept + accepted):
            raise RuntimeError("llama.cpp could not free a rejected draft's KV cells")

    def _start_followers(self, leader: Slot, now: float) -> None:
        """Copy the leader's prompt cells to each follower, which samples its first token from the leader's row
        (samplers only read the row)."""
        followers, leader.followers = leader.followers, []
        for slot in followers:
            assert slot.sampler is not None
            self.runtime.copy_sequence(leader.seq_id, slot.seq_id)
            slot.cached = list(leader.cached)
            slot.last_used = now
            self.copied_prompt_tokens += len(leader.cached)
            token = slot.sampler.sample(self.runtime.ctx, leader.output_index, slot.cached[-1])
            self._take(slot, token, now, leader.output_index)

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _take(self, slot: Slot, token: int, now: float, index: int) -> None:
        """Handle a token sampled from batch entry `index`: end of generation, text through the stop matcher, or
        the length limit."""
        job = slot.job
        assert job is not None
        if self.runtime.is_end_of_generation(token):
            self._finish(slot, "stop")
            return
        job.usage.completion_tokens += 1
        self.generated_tokens += 1
        if slot.logprobs is not None:
            slot.logprobs.append(token_logprob(self.runtime.ctx, index, self.runtime.n_vocab, token,
                                               job.params.logprobs or 0, self._piece))
        content, tool = self._route(slot, slot.text.decode(self.runtime.piece(token, self._buffer)))
        out, stopped = slot.stops.feed(content) if content else ("", False)
        if out or tool:
            slot.held += out
            slot.held_tool += tool
            if now - slot.handed >= self.stream_interval or not slot.handed:
                self._emit(job, Piece(slot.held, tool_text=slot.held_tool, logprobs=None if slot.logprobs is None
                                      else self._handed_logprobs(slot)))
                slot.held = slot.held_tool = ""
                slot.handed = now
        if stopped:
            self._release(slot, Piece("", "stop"))
        elif job.usage.completion_tokens >= job.limit:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _piece(self, token: int) -> bytes:
        return self.runtime.piece(token, self._buffer)

    @staticmethod
    def _handed_logprobs(slot: Slot) -> list[TokenLogprob] | None:
        """The logprob entries to hand over with the slot's held text (None when its job asked for none)."""
        if slot.logprobs is None:
            return None
        out, slot.logprobs = slot.logprobs, []
        return out
    def _route(self, slot: Slot, text: str) -> tuple[str, str]:
        """Split decoded text into (content, tool-call text); the first TRIGGER starts the calls, and a lazy
        grammar with them, which must also accept the text that came after TRIGGER in the same token."""
        if slot.in_tools:
            return "", text
        if slot.trigger is None or not text:
            return text, ""
        content, found = slot.trigger.feed(text)
        if not found:
            return content, ""
        slot.in_tools = True
        after = slot.trigger.after
        plan, sampler = slot.job.tools if slot.job else None, slot.sampler
        if plan is not None and plan.lazy is not None and sampler is not None:
            tokens = self.runtime.model.tokenize(after.encode("utf-8"), add_bos=False, special=False) if after else []
            accepted = sampler.enable_grammar(plan.lazy, tokens)
            if len(accepted) < len(tokens):  # what the grammar refused is left out of the calls
                after = b"".join(self.runtime.piece(t, self._buffer) for t in accepted).decode("utf-8", "replace")
        return content, after

    def _finish(self, slot: Slot, reason: str) -> None:
        content, tool = self._route(slot, slot.text.decode(b"", final=True))
        if slot.trigger is not None and not slot.in_tools:
            content += slot.trigger.flush()
        held, _ = slot.stops.feed(content) if content else ("", False)
        slot.held += held + slot.stops.flush()
        slot.held_tool += tool
        self._release(slot, Piece("", reason))

    def _release(self, slot: Slot, last: Piece | BaseException) -> None:
        """End the slot's job; the slot's cache keeps what was decoded, for the next prompt that shares it."""
        job, slot.job = slot.job, None
        held, slot.held = slot.held, ""
        logprobs, slot.logprobs = self._handed_logprobs(slot), None
        for other in self.slots:  # a follower leaves its leader; a leader's followers compute the prompt themselves
            if slot in other.followers:
                other.followers.remove(slot)
        for follower in slot.followers:
            if follower.job is not None:
                follower.pending = list(follower.job.tokens)
        slot.followers = []
        held_tool, slot.held_tool = slot.held_tool, ""
        if slot.sampler is not None:
            slot.sampler.close()
            slot.sampler = None
        slot.pending = []
        slot.next_token = None
        slot.last_used = time.monotonic()
        if isinstance(last, BaseException):  # the cache state of a failed step is unknown: start afresh
            self.runtime.forget(slot.seq_id, -1)
            slot.cached = []
        if job is None:
            return
        if isinstance(last, Piece) and last.finish_reason != "cancelled":
            last = Piece(held + last.text, last.finish_reason, tool_text=held_tool,  # held text goes with the reason
                         logprobs=logprobs)
        self._emit(job, last)
