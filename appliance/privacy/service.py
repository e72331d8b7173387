"""`Privacy`: the one object the rest of the appliance calls to apply the privacy policy to a surface.

    privacy.apply("rag", text)            -> Applied(text, found, blocked): never raises
    privacy.enforce("prompt", text)       -> the rewritten text, or raises PiiBlocked (422) when the policy blocks
    privacy.allows_storing("cache", text) -> False when the text carries an entity the surface blocks
    privacy.scrub("audit", details)       -> a copy of a JSON-like value with every string rewritten
    privacy.stream("output")              -> a StreamRedactor for text arriving in pieces (None: nothing to do)
    privacy.pseudonym("email", value)     -> the keyed, stable pseudonym, e.g. to find a subject's records

The policy can be replaced while running (`use_policy`): the detectors are rebuilt and swapped in one assignment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.privacy.actions import Applied, PiiBlocked, Placeholders, Pseudonymizer, rewrite
from appliance.privacy.detectors import Detector, Entity, builtin_detectors, detect, secret_may_be_forming
from appliance.privacy.policy import Action, PrivacyPolicy, Surface
from appliance.privacy.streaming import StreamRedactor


@dataclass(frozen=True)
class _Active:
    policy: PrivacyPolicy
    detectors: Sequence[Detector]
    types: dict[str, frozenset[str] | None]  # per surface: the entity types worth detecting (None: all)


class Privacy:
    def __init__(self, policy: PrivacyPolicy, pseudonym_key: bytes,
                 detectors: Sequence[Detector] | None = None) -> None:
        self._pseudonymize = Pseudonymizer(pseudonym_key)
        self._fixed_detectors = detectors
        self._active = self._activate(policy)

    def _activate(self, policy: PrivacyPolicy) -> _Active:
        detectors = self._fixed_detectors
        if detectors is None:
            detectors = builtin_detectors(policy.phone_regions, policy.custom, policy.ner)
        types: dict[str, frozenset[str] | None] = {}
        for surface, actions in policy.surfaces.items():
            if actions.get("default", "allow") != "allow":
                types[surface] = None
            else:
                types[surface] = frozenset(e for e, a in actions.items() if a != "allow" and e != "default")
        return _Active(policy, detectors, types)

    @property
    def policy(self) -> PrivacyPolicy:
        return self._active.policy

    def use_policy(self, policy: PrivacyPolicy) -> None:
        self._active = self._activate(policy)

    def detect(self, text: str, surface: Surface | None = None) -> list[Entity]:
        """Entities in `text`: all of them, or only those `surface` does not simply allow."""
        active = self._active
        types = active.types.get(surface) if surface is not None else None
        if types is not None and not types:
            return []
        return detect(text, active.detectors, types)

    def action(self, surface: Surface, entity_type: str) -> Action:
        return self._active.policy.action(surface, entity_type)

    def apply(self, surface: Surface, text: str, placeholders: Placeholders | None = None) -> Applied:
        """The text with the surface's actions applied; `blocked` names types the surface blocks (their values are
        redacted in `text`). Pass one `placeholders` for several texts of one request to number them together."""
        if not text:
            return Applied(text)
        entities = self.detect(text, surface)
        if not entities:
            return Applied(text)
        policy = self._active.policy
        return rewrite(text, entities, lambda t: policy.action(surface, t), self._pseudonymize,
                       placeholders if placeholders is not None else Placeholders())

    def enforce(self, surface: Surface, text: str, placeholders: Placeholders | None = None,
                where: str = "the request") -> str:
        """The rewritten text, or PiiBlocked (422, naming the entity types) when the surface blocks one."""
        applied = self.apply(surface, text, placeholders)
        if applied.blocked:
            raise PiiBlocked(applied.blocked, where)
        return applied.text

    def allows_storing(self, surface: Surface, text: str) -> bool:
        """For stores (cache, conversations, rag): False when the text carries an entity the surface blocks."""
        return not self.apply(surface, text).blocked

    def passes_everything(self, surface: Surface) -> bool:
        return self._active.policy.passes_everything(surface)

    def scrub(self, surface: Surface, value: Any, placeholders: Placeholders | None = None) -> Any:
        """A copy of a JSON-like value (dicts, lists, strings) with every string rewritten by the surface's
        actions; blocking does not apply (records are written regardless), blocked values are redacted."""
        if self.passes_everything(surface):
            return value
        marks = placeholders if placeholders is not None else Placeholders()
        return self._scrub(surface, value, marks)

    def _scrub(self, surface: Surface, value: Any, marks: Placeholders) -> Any:
        if isinstance(value, str):
            return self.apply(surface, value, marks).text if len(value) >= 6 else value
        if isinstance(value, dict):
            return {k: self._scrub(surface, v, marks) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub(surface, v, marks) for v in value]
        return value

    def stream(self, surface: Surface, where: str = "the model's answer") -> StreamRedactor | None:
        """A redactor for text arriving in pieces, or None when the surface allows everything. Its `feed`/`flush`
        raise PiiBlocked when the surface blocks an entity found."""
        if self.passes_everything(surface):
            return None
        marks = Placeholders()
        policy = self._active.policy

        def apply(text: str, entities: list[Entity]) -> Applied:
            applied = rewrite(text, entities, lambda t: policy.action(surface, t), self._pseudonymize, marks)
            if applied.blocked:
                raise PiiBlocked(applied.blocked, where)
            return applied

        types = self._active.types.get(surface)
        forming = secret_may_be_forming if types is not None and types <= {"secret"} else None
        return StreamRedactor(lambda text: self.detect(text, surface), apply, may_be_forming=forming)

    def pseudonym(self, entity_type: str, value: str) -> str:
        return self._pseudonymize(entity_type, value)
