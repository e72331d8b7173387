"""Privacy: PII detection and actions per surface, retention and erasure (policies/privacy.toml).

The interface for the rest of the appliance (RAG, cache, gateway, logs, audit), all on `services.privacy`
(a `PrivacyControls`):

* `services.privacy.privacy.apply(surface, text) -> Applied(text, found, blocked)`: rewrite a text for a surface
  ("prompt", "output", "logs", "audit", "usage", "conversations", "cache", "rag"); never raises.
* `services.privacy.privacy.enforce(surface, text)`: the rewritten text, or `PiiBlocked` (422) when blocked.
* `services.privacy.privacy.allows_storing("cache", text)`: False when the policy says not to store it (the default
  for the cache when the request carries any PII).
* `services.privacy.retention.register(store)`: a store implementing `ErasableStore` (`data_class`,
  `purge_older_than(cutoff)`, `erase_subject(subject)`, `report()`, `compact()`) joins purges, erasures and reports.
"""

from __future__ import annotations

from appliance.privacy.actions import Applied, PiiBlocked
from appliance.privacy.controls import PrivacyControls
from appliance.privacy.policy import PolicyError, PrivacyPolicy, Surface
from appliance.privacy.retention import ErasableStore, StoreReport, Subject
from appliance.privacy.service import Privacy

__all__ = [
           "Applied",
           "ErasableStore",
           "PiiBlocked",
           "PolicyError",
           "Privacy",
           "PrivacyControls",
           "PrivacyPolicy",
           "StoreReport",
           "Subject",
           "Surface",
]
