"""What the privacy policy in force does to a sample text: the entities its detectors find, and what each surface
would pass on or block. For trying a policy out before relying on it (`POST /api/privacy/detect`)."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.errors import PayloadTooLarge
from appliance.privacy.detectors import Entity
from appliance.privacy.policy import SURFACES, Action, Surface
from appliance.privacy.service import Privacy

MAX_SAMPLE_CHARS = 20_000


@dataclass(frozen=True)
class SurfaceOutcome:
    """One surface's treatment of the sample. `action`: the action taken on what was found ("allow" when nothing
    was, "block" when any entity is blocked, "mixed" when types found are treated differently); `actions` per type
    found; `text` is what the surface passes on, None when it blocks the sample."""

    action: str
    blocked: bool
    text: str | None
    actions: dict[str, Action]


@dataclass(frozen=True)
class Preview:
    findings: list[Entity]
    surfaces: dict[Surface, SurfaceOutcome]


def preview(privacy: Privacy, text: str) -> Preview:
    """Run the policy's detectors on `text` and apply each surface's actions to it."""
    if len(text) > MAX_SAMPLE_CHARS:
        raise PayloadTooLarge(f"the sample has {len(text)} characters; try at most {MAX_SAMPLE_CHARS} at a time",
                              param="text")
    findings = privacy.detect(text)
    kinds = sorted({entity.type for entity in findings})
    surfaces: dict[Surface, SurfaceOutcome] = {}
    for surface in SURFACES:
        applied = privacy.apply(surface, text)
        actions = {kind: privacy.action(surface, kind) for kind in kinds}
        taken = {a for kind, a in actions.items() if kind in applied.found} - {"allow"}
        action = "block" if applied.blocked else taken.pop() if len(taken) == 1 else "mixed" if taken else "allow"
        surfaces[surface] = SurfaceOutcome(action, bool(applied.blocked),
                                           None if applied.blocked else applied.text, actions)
    return Preview(findings, surfaces)
