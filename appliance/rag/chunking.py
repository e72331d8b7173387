"""Blocks into chunks that follow the document's structure: a chunk never spans two sections, paragraphs are packed
whole while they fit, and a paragraph longer than a chunk is cut at word-piece boundaries into overlapping windows.
Sizes are counted in the embedding model's own tokens (all-MiniLM-L6-v2 reads 256 word-pieces)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Protocol

from appliance.rag.parsers import Block

MIN_BUDGET = 32


@dataclass(frozen=True)
class Chunk:
    position: int  # 0-based order in the document
    headings: tuple[str, ...]
    text: str  # the passage as it appears in the document

    @property
    def heading_path(self) -> str:
        return " > ".join(self.headings)

    @property
    def indexed_text(self) -> str:
        """What is embedded and keyword-indexed: the heading path gives a passage its context."""
        return f"{self.heading_path}\n{self.text}" if self.headings else self.text


class Tokenizer(Protocol):
    """What chunking needs from the embedding model's tokenizer."""

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def token_offsets(self, text: str) -> list[tuple[int, int]]: ...


def chunk_blocks(blocks: Iterable[Block], tokenizer: Tokenizer, max_tokens: int, overlap: int) -> list[Chunk]:
    overlap = min(overlap, max_tokens // 4)
    chunks: list[Chunk] = []
    for headings, group in groupby(blocks, key=lambda b: b.headings):
        texts = [b.text for b in group]
        prefix = tokenizer.count_tokens([" > ".join(headings)])[0] + 1 if headings else 0
        budget = max(max_tokens - prefix, MIN_BUDGET)
        for text in _pack(texts, tokenizer, budget, overlap):
            chunks.append(Chunk(len(chunks), headings, text))
    return chunks


def _pack(texts: list[str], tokenizer: Tokenizer, budget: int, overlap: int) -> Iterable[str]:
    """Paragraphs packed into pieces of at most `budget` tokens; each piece after the first in a section starts with
    the last `overlap` tokens of the piece before it."""
    counts = tokenizer.count_tokens(texts)
    current: list[str] = []
    size = 0
    for text, count in zip(texts, counts, strict=True):
        if count > budget:
            if current:
                yield "\n\n".join(current)
            windows = _windows(text, tokenizer, budget, overlap)
            yield from windows[:-1]
            current, size = [windows[-1]], tokenizer.count_tokens([windows[-1]])[0]
            continue
        if current and size + count > budget:
            piece = "\n\n".join(current)
            yield piece
            tail = _tail(piece, tokenizer, overlap) if overlap else ""
            current, size = ([tail] if tail else []), (tokenizer.count_tokens([tail])[0] if tail else 0)
            if size + count > budget:
                current, size = [], 0
        current.append(text)
        size += count
    if current:
        yield "\n\n".join(current)


def _windows(text: str, tokenizer: Tokenizer, budget: int, overlap: int) -> list[str]:
    """Windows of at most `budget` word-pieces, cut between words (not inside one), each after the first starting
    about `overlap` word-pieces before the end of the one before it."""
    spans = tokenizer.token_offsets(text)
    starts = [i for i in range(len(spans)) if i == 0 or spans[i][0] > spans[i - 1][1]]  # word-initial pieces
    out = []
    start = 0
    while True:
        end = min(start + budget, len(spans))
        if end < len(spans):  # back off to a word's first piece, unless one word fills the window
            cut = starts[bisect.bisect_right(starts, end) - 1]  # the last word start at or before `end`
            end = cut if cut > start else end
        out.append(text[spans[start][0] : spans[end - 1][1]])
        if end >= len(spans):
            return out
        nxt = max(end - overlap, start + 1)
        word = starts[bisect.bisect_right(starts, nxt) - 1]
        start = word if word > start else nxt


def _tail(text: str, tokenizer: Tokenizer, tokens: int) -> str:
    spans = tokenizer.token_offsets(text)
    if len(spans) <= tokens:
        return text
    return text[spans[-tokens][0] :].lstrip()
