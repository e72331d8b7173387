"""The registry of permissions: every action a route or command may require, each documented.

A route names exactly one of these (see `appliance.auth.guards.requires`); roles in policies/rbac.toml grant them."""

from __future__ import annotations

PERMISSIONS: dict[str, str] = {
    "chat:use": "Create chat and text completions and responses (/v1/chat/completions, /v1/completions, "
                "/v1/responses), and read and delete one's own stored responses.",
    "embeddings:use": "Create embeddings (/v1/embeddings).",
    "models:read": "List models and their details (/v1/models) and the catalog of models to pull (/api/catalog).",
    "models:manage": "Pull, import, remove, load and unload models; set aliases and stages.",
    "rag:read": "Query the collections the principal may read.",
    "rag:write": "Add and delete documents in the collections the principal may write.",
    "rag:admin": "Create and delete collections and change who may use them.",
    "users:manage": "Create, disable and change the role of users.",
    "keys:manage": "Create, list and revoke any API key.",
    "keys:own": "Create, list and revoke one's own API keys.",
    "policies:manage": "Change privacy, retention and quota policies, and read and replace the roles file "
                       "(/api/policies/rbac).",
    "audit:read": "Read and export the audit log.",
    "usage:read": "Read token and request usage by user, model and key over time (/api/usage).",
    "privacy:read": "Read the privacy report (what data is held, counts, oldest item, next purge) and the privacy "
                    "policy in force (/api/privacy/report, GET /api/privacy/policy), and try its detectors on a "
                    "sample text (/api/privacy/detect).",
    "privacy:admin": "Change the privacy policy (PUT /api/privacy/policy), run a purge and erase a subject's data "
                     "(/api/privacy/purge, /api/privacy/erasures), and read and delete anyone's stored responses "
                     "(/v1/responses/{id}).",
    "metrics:read": "Read Prometheus metrics (/metrics), the dashboard and the alerts (/api/dashboard, /api/alerts) "
                    "and the API schema.",
    "cache:admin": "See the response cache's size and partitions and clear it (/api/cache).",
    "settings:read": "See the effective configuration with each value's source, and the doctor's findings "
                     "(/api/settings).",
    "watermark:detect": "Test a text for a model's watermark (/api/watermark/detect). Not every user's: each answer "
                        "tells a little about the secret green lists, which repeated probing could use to scrub "
                        "the watermark out of a text.",
    "self:read": "Read one's own identity (/api/me) and end one's own session (/api/auth/logout).",
}
ALL = "*"
