"""PII detectors: cheap candidate patterns, then validation (Luhn, mod-97, SSN rules, `ipaddress`, libphonenumber),
so that numbers that merely look right are left alone. One `Detector` protocol; an NER detector (Presidio) plugs in
where it is installed, for names and addresses."""

from __future__ import annotations

import base64
import binascii
import importlib
import importlib.util
import ipaddress
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import phonenumbers


@dataclass(frozen=True, order=True)
class Entity:
    """One finding: `text[start:end]` is a value of type `type`."""

    start: int
    end: int
    type: str
    value: str


@runtime_checkable
class Detector(Protocol):
    """Finds entities of `types` in a text. Detectors must be pure and thread-safe."""

    types: frozenset[str]

    def detect(self, text: str) -> list[Entity]: ...


class TextPattern(Protocol):
    """What a detector needs of a compiled pattern: Python's `re` for the built-in ones, RE2 (linear time, see
    `appliance.privacy.policy.compile_custom_pattern`) for the patterns administrators write."""

    def finditer(self, text: str, /) -> Iterator[Any]: ...


def _spans(pattern: TextPattern, text: str, kind: str, valid: Any = None) -> list[Entity]:
    out = []
    for match in pattern.finditer(text):
        value = match.group(0)
        if valid is None or valid(value, text, match.start(), match.end()):
            out.append(Entity(match.start(), match.end(), kind, value))
    return out


class EmailDetector:
    types = frozenset({"email"})
    _pattern = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9](?:[A-Za-z0-9._%+\-]{0,62}[A-Za-z0-9_%+\-])?"
                          r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9\-])")

    def detect(self, text: str) -> list[Entity]:
        if "@" not in text:
            return []
        return _spans(self._pattern, text, "email", lambda v, *_: ".." not in v)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Issuer prefixes of the card networks and the lengths each issues (Amex, Diners, JCB, Visa, Mastercard, Discover,
# UnionPay, Maestro), longest prefix first.
_CARD_NETWORKS: tuple[tuple[str, frozenset[int]], ...] = (
    ("34", frozenset({15})), ("37", frozenset({15})), ("36", frozenset({14, 16, 17, 18, 19})),
    ("30", frozenset({14, 16, 17, 18, 19})), ("38", frozenset({14, 16})), ("35", frozenset({16, 17, 18, 19})),
    ("4", frozenset({13, 16, 19})), ("5", frozenset({12, 13, 14, 15, 16, 17, 18, 19})),
    ("2", frozenset({16})), ("6", frozenset({12, 13, 14, 15, 16, 17, 18, 19})),
)


def card_network_ok(digits: str) -> bool:
    if digits[0] == "2" and not "2221" <= digits[:4] <= "2720":  # Mastercard's 2-series
        return False
    return any(digits.startswith(prefix) and len(digits) in lengths for prefix, lengths in _CARD_NETWORKS)


class CreditCardDetector:
    types = frozenset({"credit_card"})
    _pattern = re.compile(r"(?<![\w.\-])\d(?:[ \-]?\d){12,18}(?![\w\-]|\.\d)")

    def detect(self, text: str) -> list[Entity]:
        return _spans(self._pattern, text, "credit_card", self._valid)

    @staticmethod
    def _valid(value: str, text: str, start: int, _end: int) -> bool:
        if in_iban_shape(text, start):
            return False
        separators = {c for c in value if not c.isdigit()}
        if len(separators) > 1:
            return False
        digits = re.sub(r"\D", "", value)
        return 12 <= len(digits) <= 19 and card_network_ok(digits) and luhn_ok(digits)


IBAN_LENGTHS: Mapping[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_ok(compact: str) -> bool:
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


_IBAN_HEAD = re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4})* ?$")


def in_iban_shape(text: str, start: int) -> bool:
    """True when the digits at `start` continue an IBAN-shaped run (`DE89 3704 ...`): valid or not, its groups
    are not a card or a phone number."""
    return bool(_IBAN_HEAD.search(text[max(0, start - 40):start]))


class IbanDetector:
    types = frozenset({"iban"})
    _start = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2})(\d{2})")

    def detect(self, text: str) -> list[Entity]:
        out = []
        for match in self._start.finditer(text):
            length = IBAN_LENGTHS.get(match.group(1))
            if length is None:
                continue
            end = self._walk(text, match.start(), length)
            if end is not None:
                value = text[match.start():end]
                if iban_ok(value.replace(" ", "").upper()):
                    out.append(Entity(match.start(), end, "iban", value))
        return out

    @staticmethod
    def _walk(text: str, start: int, length: int) -> int | None:
        """The end of `length` alphanumerics from `start`, allowing single spaces between them."""
        count, i = 0, start
        while i < len(text) and count < length:
            ch = text[i]
            if ch.isascii() and ch.isalnum():
                count += 1
            elif not (ch == " " and i + 1 < len(text) and text[i + 1].isascii() and text[i + 1].isalnum()):
                return None
            i += 1
        if count < length or (i < len(text) and text[i].isascii() and text[i].isalnum()):
            return None
        return i


# Numbers the SSA never issues, or which were published and burned.
_SSN_BURNED = frozenset({"078051120", "219099999", "123456789"})


class SsnDetector:
    types = frozenset({"us_ssn"})
    _pattern = re.compile(r"(?<![\w\-])(\d{3})([\- ])(\d{2})\2(\d{4})(?![\w\-]|\.\d)")

    def detect(self, text: str) -> list[Entity]:
        out = []
        for m in self._pattern.finditer(text):
            area, group, serial = m.group(1), m.group(3), m.group(4)
            if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
                continue
            if area + group + serial in _SSN_BURNED:
                continue
            out.append(Entity(m.start(), m.end(), "us_ssn", m.group(0)))
        return out


class IpAddressDetector:
    types = frozenset({"ip_address"})
    _v4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
    _v6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
                     r"(?![\w:])")
    _version_before = re.compile(r"(?:\bv|\bversion\s*|\bver\.?\s*|\brelease\s*|\bbuild\s*)$", re.IGNORECASE)

    def detect(self, text: str) -> list[Entity]:
        out = _spans(self._v4, text, "ip_address", self._valid_v4)
        if text.count(":") >= 2:
            out += _spans(self._v6, text, "ip_address", self._valid_v6)
        return out

    def _valid_v4(self, value: str, text: str, start: int, _end: int) -> bool:
        if self._version_before.search(text[max(0, start - 10):start]):
            return False
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            return False
        return True

    @staticmethod
    def _valid_v6(value: str, *_: object) -> bool:
        if sum(c in "0123456789abcdefABCDEF" for c in value) < 2:
            return False
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return False
        return True


def _jwt_ok(value: str, *_: object) -> bool:
    header = value.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"\bapl_[A-Za-z0-9]{40,}"), None),  # this appliance's API keys
    (re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"), None),  # AWS access key ids
    (re.compile(r"(?i)\baws_?secret_?access_?key\b[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{40}\b"), None),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}"), _jwt_ok),
    (re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
     None),
    (re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b|\bgithub_pat_[A-Za-z0-9_]{60,}"), None),
    (re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}"), None),  # OpenAI / Anthropic
    (re.compile(r"\b(?:sk|rk)_live_[0-9A-Za-z]{24,}"), None),  # Stripe
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), None),  # Slack
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{35}"), None),  # Google API keys
)


# Every secret format above starts with one of these: one scan decides whether the patterns need to run at all.
_SECRET_PREFIXES = ("apl_", "AKIA", "ASIA", "ABIA", "ACCA", "eyJ", "-----BEGIN", *(f"gh{c}_" for c in "pousr"),
                    "github_pat_", "sk-", "sk_live_", "rk_live_", *(f"xox{c}-" for c in "abprs"), "AIza")
_SECRET_PREFIXES_ANY_CASE = ("aws_secret", "awssecret")
_SECRET_HINT = re.compile("|".join(map(re.escape, _SECRET_PREFIXES)) + "|(?i:aws_?secret)")
_LONGEST_PREFIX = max(map(len, (*_SECRET_PREFIXES, *_SECRET_PREFIXES_ANY_CASE)))
_SECRET_STARTS = frozenset(p[:n] for p in _SECRET_PREFIXES for n in range(1, len(p) + 1))
_SECRET_STARTS_ANY_CASE = frozenset(p[:n] for p in _SECRET_PREFIXES_ANY_CASE for n in range(1, len(p) + 1))


def secret_may_be_forming(text: str) -> bool:
    """Whether the end of `text` (a stream so far) may be the start of a secret still arriving: it holds a secret's
    prefix, or its last word ends in the beginning of one at a word boundary (every format but PEM starts at one,
    and PEM's dashes are boundaries). False lets a stream redactor release the word in progress at once."""
    if _SECRET_HINT.search(text):
        return True
    word_start = len(text)
    while word_start > 0 and not text[word_start - 1].isspace():
        word_start -= 1
    for i in range(max(word_start, len(text) - _LONGEST_PREFIX), len(text)):
        if i > word_start and (text[i - 1].isalnum() or text[i - 1] == "_"):
            continue  # inside a word: no secret starts here
        tail = text[i:]
        if tail in _SECRET_STARTS or tail.lower() in _SECRET_STARTS_ANY_CASE:
            return True
    return False


class SecretDetector:
    types = frozenset({"secret"})

    def detect(self, text: str) -> list[Entity]:
        if not _SECRET_HINT.search(text):
            return []
        out: list[Entity] = []
        for pattern, valid in _SECRET_PATTERNS:
            out += _spans(pattern, text, "secret", valid)
        return out


class PhoneDetector:
    """libphonenumber's matcher at the VALID leniency: numbers with +country code anywhere, and numbers written
    in the local format of `regions`."""

    types = frozenset({"phone"})

    def __init__(self, regions: Sequence[str] = ("US",)) -> None:
        self.regions = tuple(regions) or ("US",)

    def detect(self, text: str) -> list[Entity]:
        if sum(c.isdigit() for c in text) < 7:
            return []
        found: dict[tuple[int, int], Entity] = {}
        for region in self.regions:
            for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                if in_iban_shape(text, match.start):
                    continue
                found.setdefault((match.start, match.end),
                                 Entity(match.start, match.end, "phone", match.raw_string))
        return list(found.values())


class PatternDetector:
    """A custom entity from the policy's [custom.<name>] pattern."""

    def __init__(self, name: str, pattern: TextPattern) -> None:
        self.types = frozenset({name})
        self.name = name
        self.pattern = pattern

    def detect(self, text: str) -> list[Entity]:
        return [e for e in _spans(self.pattern, text, self.name) if e.end > e.start]


class PresidioDetector:
    """Names and places from Presidio's NER (spaCy); built only where `presidio_analyzer` is installed."""

    _TYPES: Mapping[str, str] = {"PERSON": "person", "LOCATION": "location"}

    def __init__(self, threshold: float = 0.6) -> None:
        analyzer = importlib.import_module("presidio_analyzer")  # optional: not a dependency of the appliance
        self.types = frozenset(self._TYPES.values())
        self.threshold = threshold
        self.engine = analyzer.AnalyzerEngine()

    def detect(self, text: str) -> list[Entity]:
        results = self.engine.analyze(text=text, entities=list(self._TYPES), language="en")
        return [Entity(r.start, r.end, self._TYPES[r.entity_type], text[r.start:r.end])
                for r in results if r.score >= self.threshold]


def presidio_available() -> bool:
    return importlib.util.find_spec("presidio_analyzer") is not None


# Which finding wins where two overlap: validated formats before looser ones.
PRIORITY: Mapping[str, int] = {"secret": 0, "iban": 1, "credit_card": 2, "us_ssn": 3, "email": 4, "ip_address": 5,
                               "phone": 6, "person": 8, "location": 9}


def resolve(entities: Iterable[Entity]) -> list[Entity]:
    """Non-overlapping findings in text order: on overlap the higher priority (then the longer) one wins."""
    ranked = sorted(entities, key=lambda e: (PRIORITY.get(e.type, 7), -(e.end - e.start), e.start))
    taken: list[Entity] = []
    for entity in ranked:
        if all(entity.end <= t.start or entity.start >= t.end for t in taken):
            taken.append(entity)
    return sorted(taken)


def builtin_detectors(phone_regions: Sequence[str] = ("US",),
                      custom: Mapping[str, TextPattern] | None = None, ner: str = "auto") -> list[Detector]:
    detectors: list[Detector] = [SecretDetector(), EmailDetector(), CreditCardDetector(), IbanDetector(),
                                 SsnDetector(), IpAddressDetector(), PhoneDetector(phone_regions)]
    detectors += [PatternDetector(name, pattern) for name, pattern in (custom or {}).items()]
    if ner == "auto" and presidio_available():
        detectors.append(PresidioDetector())
    return detectors


def detect(text: str, detectors: Sequence[Detector], types: frozenset[str] | None = None) -> list[Entity]:
    """Every entity of `types` (None: all) that `detectors` find in `text`, without overlaps."""
    found: list[Entity] = []
    for detector in detectors:
        if types is None or detector.types & types:
            found += [e for e in detector.detect(text) if types is None or e.type in types]
    return resolve(found)
