"""The privacy policy (policies/privacy.toml): entity types, the action for each on each surface, retention per
data class. Loaded and validated with msgspec; every error names the file, the line and the field that is wrong."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal, cast

import msgspec
import re2

from appliance.privacy.detectors import TextPattern
from appliance.resources import shipped
from appliance.toml_lines import LocatedError, locate, syntax_error_line, validation_error_path

SHIPPED_PRIVACY = shipped("policies/privacy.toml")

Action = Literal["allow", "redact", "mask", "pseudonymize", "block"]
ACTIONS: tuple[Action, ...] = ("allow", "redact", "mask", "pseudonymize", "block")
Surface = Literal["prompt", "output", "logs", "audit", "usage", "conversations", "cache", "rag"]
SURFACES: tuple[Surface, ...] = ("prompt", "output", "logs", "audit", "usage", "conversations", "cache", "rag")
# Records that are always written cannot be refused; they can only hide the values.
RECORD_SURFACES = frozenset({"logs", "audit", "usage"})
BUILTIN_ENTITIES = ("email", "phone", "credit_card", "iban", "us_ssn", "ip_address", "secret")
NER_ENTITIES = ("person", "location")
DATA_CLASSES = ("usage", "audit", "sessions", "conversations", "rag_documents", "cache_entries", "uploads")
DEFAULT = "default"
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the reason goes back to the administrator, not to the server's stderr


class PolicyError(LocatedError):
    """The privacy policy cannot be used; the message names the file, the line and what to fix (`line` and `reason`
    hold them apart, for the API's error)."""


class DetectorsSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    phone_regions: list[str] = msgspec.field(default_factory=lambda: ["US"])
    ner: Literal["auto", "off"] = "auto"


class CustomEntity(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pattern: str
    description: str = ""


class ConversationsSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    store: bool = False


class RetentionSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    purge_interval: str = "1h"
    usage: str = "90d"
    audit: str = "400d"
    sessions: str = "30d"
    conversations: str = "30d"
    rag_documents: str = "0"
    cache_entries: str = "7d"
    uploads: str = "30d"


class PolicyFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    version: Literal[1] = 1
    detectors: DetectorsSection = msgspec.field(default_factory=DetectorsSection)
    surfaces: dict[str, dict[str, str]] = msgspec.field(default_factory=dict)
    conversations: ConversationsSection = msgspec.field(default_factory=ConversationsSection)
    retention: RetentionSection = msgspec.field(default_factory=RetentionSection)
    custom: dict[str, CustomEntity] = msgspec.field(default_factory=dict)


@dataclass(frozen=True)
class PrivacyPolicy:
    """A validated policy. `action(surface, entity)` is what to do with an entity found on a surface."""

    surfaces: Mapping[str, Mapping[str, Action]]
    retention: Mapping[str, timedelta | None]
    purge_interval: timedelta
    custom: Mapping[str, TextPattern] = field(default_factory=dict)
    phone_regions: tuple[str, ...] = ("US",)
    ner: Literal["auto", "off"] = "auto"
    store_conversations: bool = False
    text: str = ""
    source: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def entities(self) -> tuple[str, ...]:
        return (*BUILTIN_ENTITIES, *NER_ENTITIES, *self.custom)

    def action(self, surface: Surface, entity: str) -> Action:
        actions = self.surfaces.get(surface, {})
        return actions.get(entity) or actions.get(DEFAULT) or "allow"

    def passes_everything(self, surface: Surface) -> bool:
        """True when the surface allows every entity: callers may skip detection altogether."""
        actions = self.surfaces.get(surface, {})
        return all(a == "allow" for a in actions.values())


def parse_duration(text: str) -> timedelta | None:
    """'90d', '12h', '30m', '45s', '2w', or '0' for no limit (None)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration; write e.g. '30d', '12h', '90m', or '0' to keep forever")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    return timedelta(seconds=seconds) if seconds else None


def format_duration(age: timedelta | None) -> str:
    if age is None:
        return "forever"
    seconds = int(age.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _fail(source: str, text: str, path: Sequence[str], message: str) -> PolicyError:
    line = locate(text, path)
    where = f"{source} line {line}" if line else source
    reason = f"{'.'.join(path)}: {message}"
    return PolicyError(f"{where}: {reason}", line=line, reason=reason)


def load_policy(path: str | Path = "") -> PrivacyPolicy:
    """The policy at `path` (empty: the shipped policies/privacy.toml)."""
    source = Path(path) if path else SHIPPED_PRIVACY
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise PolicyError(f"no privacy policy at {source}; set privacy.policy_file to the path of privacy.toml"
                          ) from None
    return parse_policy(text, str(source))


def parse_policy(text: str, source: str = "privacy.toml") -> PrivacyPolicy:
    """Validate a policy document; raises PolicyError naming the line and field that is wrong."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}", line=syntax_error_line(exc, text),
                          reason=f"not valid TOML: {exc}") from None
    try:
        parsed = msgspec.convert(raw, PolicyFile)
    except msgspec.ValidationError as exc:
        raise _fail(source, text, *validation_error_path(exc)) from None
    custom = _custom_patterns(parsed, text, source)
    known = (*BUILTIN_ENTITIES, *NER_ENTITIES, *custom)
    for surface, actions in parsed.surfaces.items():
        if surface not in SURFACES:
            raise _fail(source, text, ["surfaces", surface], f"unknown surface {surface!r}; surfaces are "
                        f"{', '.join(SURFACES)}")
        for entity, action in actions.items():
            if action not in ACTIONS:
                raise _fail(source, text, ["surfaces", surface, entity],
                            f"unknown action {action!r}; actions are {', '.join(ACTIONS)}")
            if entity != DEFAULT and entity not in known:
                raise _fail(source, text, ["surfaces", surface, entity],
                            f"unknown entity {entity!r}; entities are default, {', '.join(known)} "
                            "(add a [custom.<name>] pattern for another)")
            if action == "block" and surface in RECORD_SURFACES:
                raise _fail(source, text, ["surfaces", surface, entity],
                            f"'block' cannot apply to {surface}, which are always written; use redact, mask or "
                            "pseudonymize")
    return PrivacyPolicy(
        surfaces={s: cast(dict[str, Action], dict(parsed.surfaces.get(s, {}))) for s in SURFACES},
        retention=_retention(parsed.retention, text, source),
        purge_interval=_purge_interval(parsed.retention.purge_interval, text, source),
        custom=custom,
        phone_regions=_regions(parsed.detectors.phone_regions, text, source),
        ner=parsed.detectors.ner,
        store_conversations=parsed.conversations.store,
        text=text,
        source=source,
    )


def compile_custom_pattern(pattern: str) -> TextPattern:
    """An administrator's pattern, compiled by RE2: matching takes time linear in the text whatever the pattern,
    so no pattern can hang a request (Python's `re` backtracks: `(a+)+$` takes exponential time). ValueError
    names what RE2 refuses, with the usual cause."""
    try:
        compiled = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"RE2, the linear-time engine for custom patterns, cannot compile it: {reason}. RE2 has "
                         "no backreferences (\\1) and no lookaround ((?=, (?!, (?<=, (?<!); match the text itself "
                         "instead, e.g. with \\b word boundaries") from None
    if compiled.match(""):
        raise ValueError("the pattern matches empty text; it would match everywhere")
    return cast(TextPattern, compiled)


def _custom_patterns(parsed: PolicyFile, text: str, source: str) -> dict[str, TextPattern]:
    custom: dict[str, TextPattern] = {}
    for name, entity in parsed.custom.items():
        if not _NAME.match(name) or name in (*BUILTIN_ENTITIES, *NER_ENTITIES, DEFAULT):
            raise _fail(source, text, ["custom", name], "a custom entity needs a new lowercase name (a-z, 0-9, _) "
                        "that is not a built-in entity")
        try:
            custom[name] = compile_custom_pattern(entity.pattern)
        except ValueError as exc:
            raise _fail(source, text, ["custom", name, "pattern"], str(exc)) from None
    return custom


def _retention(section: RetentionSection, text: str, source: str) -> dict[str, timedelta | None]:
    out: dict[str, timedelta | None] = {}
    for name in DATA_CLASSES:
        try:
            out[name] = parse_duration(getattr(section, name))
        except ValueError as exc:
            raise _fail(source, text, ["retention", name], str(exc)) from None
    return out


def _purge_interval(value: str, text: str, source: str) -> timedelta:
    try:
        interval = parse_duration(value)
    except ValueError as exc:
        raise _fail(source, text, ["retention", "purge_interval"], str(exc)) from None
    if interval is None or interval < timedelta(minutes=1):
        raise _fail(source, text, ["retention", "purge_interval"], "must be at least 1m")
    return interval


def _regions(regions: list[str], text: str, source: str) -> tuple[str, ...]:
    import phonenumbers

    for region in regions:
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise _fail(source, text, ["detectors", "phone_regions"], f"{region!r} is not a region code; use "
                        "two-letter ISO codes such as US, GB, DE")
    return tuple(regions)
