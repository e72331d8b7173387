"""Prompt-lookup drafts for speculative decoding: an answer that copies from its prompt (a RAG answer quoting its
sources, a code edit) repeats runs of tokens the prompt already holds, so the tokens that followed the latest earlier
occurrence of the sequence's last few tokens are a cheap guess at what comes next.

The scheduler decodes such a draft with the token it sampled, in one step with logits for every entry, and keeps the
draft's tokens as long as its own sampler picks them (`Scheduler._verify`): the output is the one decoding without a
draft gives, only sooner when the guess was right. The index is kept up to date a token at a time (a dict per n-gram
size), so a draft costs a few dict lookups, not a scan of the context."""

from __future__ import annotations

from collections.abc import Iterable

NGRAMS = (4, 3, 2)  # n-gram sizes tried, longest first: a longer match is a better guess
MISS_PAUSE = 4  # steps without drafting after a draft whose first token was wrong (the answer left its sources)


class PromptLookup:
    """The tokens of one sequence (prompt, then output) and, for each n-gram, where it last occurred."""

    def __init__(self, tokens: Iterable[int] = (), max_draft: int = 8) -> None:
        self.max_draft = max_draft
        self.tokens: list[int] = []
        self.follows: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAMS}  # n-gram -> next position
        self.pause = 0
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        seq, follows = self.tokens, self.follows
        for token in tokens:
            seq.append(token)
            end = len(seq) - 1  # the n-grams ending just before the new token are followed by it
            for n, index in follows.items():
                if end >= n:
                    index[tuple(seq[end - n:end])] = end

    def draft(self, room: int) -> list[int]:
        """Up to min(max_draft, room) tokens that followed the latest earlier occurrence of the longest n-gram
        that ends the sequence; none when nothing matches or after a recent miss."""
        if self.pause:
            self.pause -= 1
            return []
        room = min(room, self.max_draft)
        seq = self.tokens
        if room <= 0:
            return []
        for n, index in self.follows.items():
            if len(seq) > n:
                at = index.get(tuple(seq[-n:]))
                if at is not None:
                    return seq[at:at + room]
        return []

    def missed(self) -> None:
        """The last draft's first token was wrong: stop guessing for a few steps."""
        self.pause = MISS_PAUSE
