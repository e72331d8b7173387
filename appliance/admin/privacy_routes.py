"""Privacy over JSON (`/api/privacy/...`): the report (privacy:read), the policy in force and its versions
(privacy:read; PUT with privacy:admin stores a new version, audited), a purge and erasure by subject
(privacy:admin). Thin handlers over `appliance.privacy.controls.PrivacyControls`."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from litestar import Request, get, post, put
from litestar.datastructures import State

from appliance.admin.keys_routes import actor_of, decode_body
from appliance.auth.guards import permission
from appliance.errors import InvalidRequest
from appliance.privacy.controls import PrivacyControls
from appliance.privacy.policy import PolicyError

NO_STORE = {"cache-control": "no-store"}


class PolicyBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    policy: str


class ErasureBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    subject: str


def _controls(state: State) -> PrivacyControls:
    controls: PrivacyControls = state.services.privacy
    return controls


@get("/api/privacy/report", summary="What classes of data are held: counts, oldest item, retention, next purge",
     opt=permission("privacy:read"), tags=["Privacy"])
async def privacy_report(state: State) -> dict[str, Any]:
    return dataclasses.asdict(_controls(state).retention.report())


@get("/api/privacy/policy", summary="The privacy policy in force (TOML text) and its version",
     opt=permission("privacy:read"), tags=["Privacy"])
async def get_policy(state: State) -> dict[str, Any]:
    controls = _controls(state)
    policy = controls.privacy.policy
    return {"version": controls.version, "source": "database" if controls.version else policy.source,
            "digest": policy.digest, "policy": policy.text,
            "history": [dataclasses.asdict(v) for v in controls.versions.history()]}


@put("/api/privacy/policy", summary="Replace the privacy policy: validated, stored as a new version, audited",
     opt=permission("privacy:admin"), tags=["Privacy"])
async def put_policy(request: Request[Any, Any, Any], state: State) -> dict[str, Any]:
    body = decode_body(await request.body(), PolicyBody, '{"policy": "<the TOML text of privacy.toml>"}')
    try:
        stored, _ = _controls(state).change_policy(body.policy, actor_of(request))
    except PolicyError as exc:
        raise InvalidRequest(str(exc), param="policy", code="invalid_policy") from None
    return {"version": stored.version, "digest": stored.digest, "created_at": stored.created_at}


@post("/api/privacy/erasures", summary="Erase everything held about a user (name) or a person (email)",
      opt=permission("privacy:admin"), tags=["Privacy"], status_code=200)
async def erase_subject(request: Request[Any, Any, Any], state: State) -> dict[str, Any]:
    body = decode_body(await request.body(), ErasureBody, '{"subject": "alice"}')
    return {"deleted": _controls(state).retention.erase(body.subject, actor_of(request))}


@post("/api/privacy/purge", summary="Delete everything past its retention now (the periodic job, on demand)",
      opt=permission("privacy:admin"), tags=["Privacy"], status_code=200)
async def purge_now(request: Request[Any, Any, Any], state: State) -> dict[str, Any]:
    return {"deleted": _controls(state).retention.purge(actor_of(request))}


ROUTES = [privacy_report, get_policy, put_policy, erase_subject, purge_now]
