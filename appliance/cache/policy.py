"""May a response be cached? The privacy policy's `cache` surface decides (`Privacy.allows_storing("cache", ...)`,
policies/privacy.toml: by default a request carrying any personal data is not cached).

Without a policy object (a tool or a test that builds the cache alone), the same default applies with the privacy
package's built-in detectors: any entity found means no."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from appliance.privacy.detectors import Detector as PiiDetector
from appliance.privacy.detectors import builtin_detectors, detect

if TYPE_CHECKING:
    from appliance.privacy.service import Privacy

Detector = Callable[[Sequence[str]], bool]
"""True when a request made of these texts may have its response stored."""


@functools.cache
def _detectors() -> tuple[PiiDetector, ...]:
    return tuple(builtin_detectors(ner="off"))


def no_pii(texts: Sequence[str]) -> bool:
    """The default without a policy: no text carries anything the privacy detectors find."""
    return not any(text and detect(text, _detectors()) for text in texts)


def privacy_detector(privacy: Privacy) -> Detector:
    """The privacy policy in force (it may change while the server runs) as the cache's detector."""
    return lambda texts: all(privacy.allows_storing("cache", text) for text in texts if text)


def policy_digest(privacy: Privacy) -> Callable[[], str]:
    """The digest of the policy in force, computed once per policy (it may be replaced while the server runs)."""
    last: list[Any] = [None, ""]  # the policy object (held, so that `is` stays meaningful) and its digest

    def digest() -> str:
        policy = privacy.policy
        if policy is not last[0]:
            last[:] = [policy, policy.digest]
        return str(last[1])

    return digest


def may_cache(request_texts: Sequence[str], detector: Detector | None = None) -> bool:
    """Whether the response to a request made of these texts may be stored."""
    return (detector or no_pii)(request_texts)
