"""What happens to a detected entity: allow, redact (`<EMAIL_1>`), mask, pseudonymize (keyed HMAC-SHA256, stable per
value) or block (422 naming the entity types, never the values)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from appliance.errors import ApplianceError
from appliance.privacy.detectors import Entity
from appliance.privacy.policy import Action

PSEUDONYM_LABEL = b"appliance/privacy-pseudonym/v1"
PSEUDONYM_HEX = 16  # 64 bits: collisions are negligible at the scale of one box's subjects


class PiiBlocked(ApplianceError):
    """The privacy policy blocks an entity type found in the text; the message names the types, never values."""

    status_code = 422
    error_type = "invalid_request_error"
    code = "pii_blocked"

    def __init__(self, types: Iterable[str], where: str = "the request") -> None:
        self.types = tuple(sorted(set(types)))
        super().__init__(f"{where} contains personal data of type {', '.join(self.types)}, which the privacy policy "
                         "blocks; remove it (or replace it with a placeholder) and retry, or ask an admin to change "
                         "the policy", code="pii_blocked")


def derive_pseudonym_key(master_key: bytes) -> bytes:
    """The pseudonymization key, derived from the data dir's master key (like the API-key pepper)."""
    return hmac.new(master_key, PSEUDONYM_LABEL, hashlib.sha256).digest()


def normalize(entity_type: str, value: str) -> str:
    """One spelling per value, so that `Alice@Example.com` and `alice@example.com` share a pseudonym."""
    if entity_type == "email":
        return value.strip().lower()
    if entity_type in ("phone", "credit_card", "us_ssn"):
        return re.sub(r"\D", "", value)
    if entity_type == "iban":
        return re.sub(r"\s", "", value).upper()
    if entity_type == "ip_address":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    return value.strip()


class Pseudonymizer:
    """`<EMAIL:3f9a1c2b7d4e5f60>`: HMAC-SHA256 of the type and the normalized value under a secret key. The same
    value gives the same pseudonym on every surface and across restarts; without the key nobody can compute it."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def digest(self, entity_type: str, value: str) -> str:
        message = f"{entity_type}\x00{normalize(entity_type, value)}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]

    def __call__(self, entity_type: str, value: str) -> str:
        return f"<{entity_type.upper()}:{self.digest(entity_type, value)}>"


def mask(entity_type: str, value: str) -> str:
    """Hide all but what a person needs to recognise their own value: the last 4 digits, an email's domain."""
    if entity_type == "email":
        local, _, domain = value.partition("@")
        return f"{local[:1]}***@{domain}"
    if entity_type == "secret":
        return value[:4] + "*" * 8
    if entity_type == "ip_address":
        if "." in value and ":" not in value:
            return ".".join([*value.split(".")[:2], "*", "*"])
        return value.split(":", 1)[0] + ":*"
    keep = 4 if entity_type in ("credit_card", "iban", "phone", "us_ssn") else 0
    out, seen = [], 0
    for ch in reversed(value):
        if ch.isalnum():
            seen += 1
            out.append(ch if seen <= keep else "*")
        else:
            out.append(ch)
    return "".join(reversed(out))


@dataclass
class Placeholders:
    """Numbered placeholders for one text or stream: each distinct value of a type gets the next number, and the
    same value the same placeholder (`<EMAIL_1>` ... `<EMAIL_1>`)."""

    counters: dict[str, int] = field(default_factory=dict)
    assigned: dict[tuple[str, str], str] = field(default_factory=dict)

    def __call__(self, entity_type: str, value: str) -> str:
        key = (entity_type, normalize(entity_type, value))
        if key not in self.assigned:
            self.counters[entity_type] = self.counters.get(entity_type, 0) + 1
            self.assigned[key] = f"<{entity_type.upper()}_{self.counters[entity_type]}>"
        return self.assigned[key]


@dataclass(frozen=True)
class Applied:
    """The rewritten text, the entity types found, and those the policy blocks (empty: nothing blocked)."""

    text: str
    found: frozenset[str] = frozenset()
    blocked: frozenset[str] = frozenset()

    @property
    def changed(self) -> bool:
        return bool(self.found)


def rewrite(text: str, entities: Sequence[Entity], action_for: Callable[[str], Action],
            pseudonymize: Callable[[str, str], str], placeholders: Placeholders) -> Applied:
    """Apply each entity's action. A blocked entity is redacted too, so the text is safe to show if a caller only
    records the refusal."""
    parts: list[str] = []
    found: set[str] = set()
    blocked: set[str] = set()
    last = 0
    for entity in entities:
        action = action_for(entity.type)
        found.add(entity.type)
        if action == "allow":
            continue
        if action == "block":
            blocked.add(entity.type)
        parts.append(text[last:entity.start])
        if action == "mask":
            parts.append(mask(entity.type, entity.value))
        elif action == "pseudonymize":
            parts.append(pseudonymize(entity.type, entity.value))
        else:  # redact, block
            parts.append(placeholders(entity.type, entity.value))
        last = entity.end
    parts.append(text[last:])
    return Applied("".join(parts), frozenset(found), frozenset(blocked))
