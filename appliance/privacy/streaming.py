"""Redacting text that arrives in pieces (SSE chunks of a model's answer), so that an entity split across chunks is
still caught, while delaying the text as little as possible.

The redactor holds back only what could still grow into an entity: the word in progress (no entity ends before a
space), the run of number-like words just before it (phone numbers, cards and IBANs are written in groups), and an
unterminated `-----BEGIN` block (PEM keys span lines). Everything before that is final: it is checked against the
whole buffer, so an entity that began in it is held with the rest, and released redacted. When the surface acts only
on entities that start with a known prefix (secrets, by default), `may_be_forming` tells whether one is in the window
or can be growing at its end; when none can, the text is released at once, without running the detectors. The hold is
bounded: `max_hold` characters (`max_block` for a PEM block); past that the text is released and an oversized key
block is redacted whole. A little already-released text stays as left context, so that rules such as "a version
string is not an IP" see what came before."""

from __future__ import annotations

import re
from collections.abc import Callable

from appliance.privacy.actions import Applied
from appliance.privacy.detectors import Entity

# A word that may be one group of a number written in groups (phone, card, IBAN: "GB82 WEST 1234 ...").
_NUMBERISH = re.compile(r"^(?:[+(]?[0-9A-Za-z()./\-]*[0-9][0-9A-Za-z()./\-]*|[A-Z0-9]{4}),?$")
_BEGIN = "-----BEGIN"
_END = re.compile(r"-----END [A-Z0-9 ]*-----")
CONTEXT = 24


class StreamRedactor:
    """`feed(text)` returns what may be shown now (redacted); `flush()` returns the rest at the end of the stream.

    `detect(text)` finds entities; `rewrite(text, entities)` applies the policy (it may raise to block)."""

    def __init__(self, detect: Callable[[str], list[Entity]], rewrite: Callable[[str, list[Entity]], Applied],
                 max_hold: int = 256, max_block: int = 8192, may_be_forming: Callable[[str], bool] | None = None
                 ) -> None:
        self._detect = detect
        self._rewrite = rewrite
        self._may_be_forming = may_be_forming
        self.max_hold = max_hold
        self.max_block = max_block
        self._buffer = ""
        self._context = ""
        self.found: set[str] = set()

    def feed(self, text: str) -> str:
        if not text:
            return ""
        self._buffer += text
        if self._may_be_forming is not None and not self._may_be_forming(self._context + self._buffer):
            # Nothing the surface acts on is in the window or can be growing at its end: no detection to run,
            # no hold (the per-token common case of a secrets-only surface)
            out, self._buffer = self._buffer, ""
            self._context = (self._context + out)[-CONTEXT:]
            return out
        cut = self._safe_cut(self._buffer)
        return self._release(cut) if cut > 0 else ""

    def flush(self) -> str:
        return self._release(len(self._buffer)) if self._buffer else ""

    def _safe_cut(self, buf: str) -> int:
        begin = buf.rfind(_BEGIN)
        if begin >= 0 and not _END.search(buf, begin):
            if len(buf) - begin <= self.max_block:
                return begin
            return len(buf)  # an oversized block: released whole (and redacted as a secret, see _release)
        cut = len(buf)
        while cut > 0 and not buf[cut - 1].isspace():  # the word in progress
            cut -= 1
        while cut > 0:  # number-like words right before it, separated by single spaces
            space = cut - 1
            if buf[space] != " ":
                break
            start = space
            while start > 0 and not buf[start - 1].isspace():
                start -= 1
            if start == space or not _NUMBERISH.match(buf[start:space]):
                break
            cut = start
        return max(cut, len(buf) - self.max_hold)

    def _release(self, cut: int) -> str:
        offset = len(self._context)
        window = self._context + self._buffer
        entities = [e if e.start >= offset else Entity(offset, e.end, e.type, window[offset:e.end])
                    for e in self._detect(window) if e.end > offset]  # what was released already stays as it was
        cut_at = offset + cut
        for entity in entities:
            if entity.start < cut_at < entity.end:
                cut_at = max(offset, entity.start)
        if cut_at == offset and cut < len(self._buffer):
            return ""
        head = window[offset:cut_at]
        inside = [Entity(e.start - offset, e.end - offset, e.type, e.value) for e in entities
                  if e.start >= offset and e.end <= cut_at]
        if _BEGIN in head and not inside and "PRIVATE KEY" in head and not _END.search(head):
            begin = head.find(_BEGIN)  # an oversized, unterminated key block: never shown
            inside = [Entity(begin, len(head), "secret", head[begin:])]
        applied = self._rewrite(head, inside)
        self.found |= applied.found
        released = window[:cut_at]
        self._context = released[-CONTEXT:]
        self._buffer = window[cut_at:]
        return applied.text
