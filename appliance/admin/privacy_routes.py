"""Privacy over JSON (`/api/privacy/...`): the report (privacy:read), the policy in force and its versions
(privacy:read; PUT with privacy:admin stores a new version, audited; an invalid one is refused naming its line), a
purge (or its dry run) and erasure by subject (privacy:admin), and trying the detectors on a sample (privacy:read).
Thin handlers over `appliance.privacy.controls.PrivacyControls`."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post, put
from litestar.datastructures import State
from litestar.params import QueryParameter

from appliance.admin.keys_routes import actor_of, decode_body
from appliance.auth.guards import permission
from appliance.errors import InvalidPolicy
from appliance.privacy.controls import PrivacyControls
from appliance.privacy.policy import PolicyError
from appliance.privacy.preview import preview

NO_STORE = {"cache-control": "no-store"}
DRY_RUN_HELP = "true: count what a purge would delete per data class, and delete nothing"


class PolicyBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    policy: str


class SampleBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: str


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
        raise InvalidPolicy(exc.reason, line=exc.line) from None
    return {"version": stored.version, "digest": stored.digest, "created_at": stored.created_at}


@post("/api/privacy/erasures", summary="Erase everything held about a user (name) or a person (email)",
      opt=permission("privacy:admin"), tags=["Privacy"], status_code=200)
async def erase_subject(request: Request[Any, Any, Any], state: State) -> dict[str, Any]:
    body = decode_body(await request.body(), ErasureBody, '{"subject": "alice"}')
    return {"deleted": await _controls(state).retention.erase_apart(body.subject, actor_of(request))}


@post("/api/privacy/purge", summary="Delete everything past its retention now (the periodic job, on demand); with "
      "dry_run=true only count what would go", opt=permission("privacy:admin"), tags=["Privacy"], status_code=200)
async def purge_now(request: Request[Any, Any, Any], state: State,
                    dry_run: Annotated[bool, QueryParameter(description=DRY_RUN_HELP)] = False) -> dict[str, Any]:
    retention = _controls(state).retention
    if dry_run:
        return {"dry_run": True, "would_delete": retention.due()}
    return {"deleted": await retention.purge_apart(actor_of(request))}


@post("/api/privacy/detect", summary="Run the policy's PII detectors on a sample: what they find and what each "
      "surface would pass on", opt=permission("privacy:read"), tags=["Privacy"], status_code=200)
async def detect_sample(request: Request[Any, Any, Any], state: State) -> Response[dict[str, Any]]:
    body = decode_body(await request.body(), SampleBody, '{"text": "write to alice@example.com"}')
    result = await asyncio.to_thread(preview, _controls(state).privacy, body.text)
    findings = [{"kind": e.type, "start": e.start, "end": e.end, "text": e.value} for e in result.findings]
    surfaces = {name: dataclasses.asdict(outcome) for name, outcome in result.surfaces.items()}
    return Response({"findings": findings, "surfaces": surfaces}, headers=NO_STORE)  # it echoes the sample's PII


ROUTES = [privacy_report, get_policy, put_policy, erase_subject, purge_now, detect_sample]
