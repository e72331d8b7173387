"""May a response be cached? The privacy policy's `cache` surface decides; by default a request carrying personal
data (PII) is not cached.

`may_cache` asks the privacy detectors of `appliance.privacy` where that package provides them, and otherwise
applies the same default with a few conservative patterns of its own (e-mail addresses, phone numbers, payment
cards that pass the Luhn check, IBANs, US social security numbers, key-like secrets): a false alarm only costs a
cache miss, a missed one would keep personal data on disk."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}[ .-]\d{3,4}[ .-]?\d{3,4}(?!\w)")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_SECRET = re.compile(r"\b(?:apl_[A-Za-z0-9]{46}|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|eyJ[\w-]+\.[\w-]+\.[\w-]+)\b"
                     r"|-----BEGIN [A-Z ]*PRIVATE KEY-----")

Detector = Callable[[Sequence[str]], bool]
"""True when the texts may be cached."""


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _has_card(text: str) -> bool:
    return any(_luhn(re.sub(r"\D", "", m.group(0))) for m in _CARD.finditer(text))


def builtin_may_cache(texts: Sequence[str]) -> bool:
    """The built-in default: no text carries anything that looks like personal data or a secret."""
    for text in texts:
        if (_EMAIL.search(text) or _PHONE.search(text) or _IBAN.search(text) or _SSN.search(text)
                or _SECRET.search(text) or _has_card(text)):
            return False
    return True


def may_cache(request_texts: Sequence[str], detector: Detector | None = None) -> bool:
    """Whether the response to a request made of these texts may be stored: `detector` when given (the privacy
    policy's `cache` surface), else the built-in default."""
    return (detector or builtin_may_cache)(request_texts)
