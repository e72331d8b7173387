"""Models over JSON: `/api/models` (each model with its production version, versions and aliases), its versions,
promote and rollback (`appliance.registry.rollout`), and `/api/aliases` (an alias, optionally a canary split).
Reading needs models:read; every change models:manage, and is audited by the service."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, delete, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath

from appliance.admin.keys_routes import actor_of, decode_body
from appliance.auth.guards import permission
from appliance.engines.remote import RemoteWorker
from appliance.feedback.service import FeedbackService
from appliance.registry.remote import parse_remote_source
from appliance.registry.rollout import RolloutService
from appliance.registry.service import ModelRecord
from appliance.registry.versions import Alias, ModelVersion
from appliance.supervisor.pool import WorkerPool


class Promotion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int


class AliasBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    target: str | None = None  # a model (its production version) or `name@N`
    canary: int | None = None  # a version that gets `weight` percent of the alias's traffic
    weight: int = 10
    strategy: str = "static"  # or "bandit": `targets` share the traffic by their ratings
    targets: list[str] | None = None
    floor: float | None = None  # a bandit target's least share (default: rollout.bandit_floor)


ALIAS_EXAMPLE = ('{"target": "my-model", "canary": 2, "weight": 10} or {"strategy": "bandit", "targets": '
                 '["my-model@1", "my-model@2"]}')


def _alias(alias: Alias, rollout: RolloutService | None) -> dict[str, Any]:
    """An alias with its split, and what it is doing: a bandit's shares per target, a canary's quality test."""
    return {**msgspec.to_builtins(alias), "weights": {str(v): w for v, w in (alias.weights or {}).items()} or None,
            **(rollout.alias_status(alias) if rollout is not None else {})}


def _versions(versions: list[ModelVersion], rollout: RolloutService, state: State) -> list[dict[str, Any]]:
    """Each version with its requests over the rollout window (`stats`), canaries and production alike, and the
    ratings of its responses (`feedback`: {"up", "down"})."""
    feedback: FeedbackService = state.services.feedback
    rated = {model: feedback.counts(model) for model in {v.model for v in versions}}
    return [{**msgspec.to_builtins(v), "stats": rollout.window_stats(v.ref).to_dict(),
             "feedback": rated[v.model].get(v.version, {"up": 0, "down": 0})} for v in versions]


@get("/api/models", summary="Installed models with their production version, versions (each with its requests, "
     "errors and p95 over the rollout window) and aliases",
     opt=permission("models:read"), tags=["Admin"])
async def list_models(rollout: NamedDependency[RolloutService], state: State) -> dict[str, Any]:
    versions, aliases = rollout.versions.all(), rollout.versions.aliases()
    data = []
    for record in rollout.registry.list():
        own = [v for v in versions if v.model == record.name]
        production = next((v.version for v in own if v.stage == "production"), None)
        data.append({**msgspec.to_builtins(record), "production_version": production,
                     "versions": _versions(own, rollout, state),
                     "aliases": [_alias(a, rollout) for a in aliases if a.model == record.name],
                     **({"upstreams": _upstreams(record, state)} if record.format == "remote" else {})})
    return {"object": "list", "data": data}


def _upstreams(record: ModelRecord, state: State) -> list[dict[str, Any]]:
    """A remote model's upstreams: their live state (up/down, requests in flight, failures) while its production
    version is loaded, else as configured with the state "idle"."""
    pool: WorkerPool = state.services.pool
    slot = pool.slots.get(pool.key(record.name))
    worker = slot.worker if slot is not None and slot.alive else None
    if isinstance(worker, RemoteWorker):
        return list(worker.pool.state()["upstreams"])
    default = state.services.settings.remote.concurrency
    return [{"url": u.url, "weight": u.weight, "concurrency": u.concurrency or default, "state": "idle",
             "outstanding": 0, "requests": 0, "failures": 0, "last_error": None, "since": None}
            for u in parse_remote_source(record.source).upstreams]


@get("/api/models/{name:str}/versions", summary="A model's versions with digest, source, stage, details and their "
     "requests over the rollout window and ratings (feedback: up, down)",
     opt=permission("models:read"), tags=["Admin"])
async def list_versions(name: FromPath[str], rollout: NamedDependency[RolloutService], state: State
                        ) -> dict[str, Any]:
    rollout.registry.get(name)  # 404 for an unknown model
    return {"object": "list", "data": _versions(rollout.versions.list(name), rollout, state)}


@post("/api/models/{name:str}/promote", summary="Blue-green promote a version to production (loaded and warmed "
      "up first; the old version drained)", status_code=200, opt=permission("models:manage"), tags=["Admin"])
async def promote(request: Request[Any, Any, Any], name: FromPath[str],
                  rollout: NamedDependency[RolloutService]) -> dict[str, Any]:
    body = decode_body(await request.body(), Promotion, '{"version": 2}')
    return (await rollout.promote(name, body.version, actor=actor_of(request))).to_dict()


@post("/api/models/{name:str}/rollback", summary="End the model's canaries, else return production to the version "
      "served before", status_code=200, opt=permission("models:manage"), tags=["Admin"])
async def rollback(request: Request[Any, Any, Any], name: FromPath[str],
                   rollout: NamedDependency[RolloutService]) -> dict[str, Any]:
    return (await rollout.rollback(name, actor=actor_of(request))).to_dict()


@get("/api/aliases", summary="Model aliases: canary splits with their quality test, bandits with their shares",
     opt=permission("models:read"), tags=["Admin"])
async def list_aliases(rollout: NamedDependency[RolloutService]) -> dict[str, Any]:
    return {"object": "list", "data": [_alias(a, rollout) for a in rollout.versions.aliases()]}


@put("/api/aliases/{alias:str}", summary="Point an alias at a model or version, optionally with a canary split; or "
     "make it a bandit over targets ({strategy: bandit, targets, floor?})",
     opt=permission("models:manage"), tags=["Admin"])
async def set_alias(request: Request[Any, Any, Any], alias: FromPath[str],
                    rollout: NamedDependency[RolloutService]) -> dict[str, Any]:
    body = decode_body(await request.body(), AliasBody, ALIAS_EXAMPLE)
    return _alias(rollout.set_alias(alias, body.target, canary=body.canary, weight=body.weight,
                                    strategy=body.strategy, targets=body.targets, floor=body.floor,
                                    actor=actor_of(request)), rollout)


@delete("/api/aliases/{alias:str}", summary="Remove an alias", status_code=200, opt=permission("models:manage"),
        tags=["Admin"])
async def remove_alias(request: Request[Any, Any, Any], alias: FromPath[str],
                       rollout: NamedDependency[RolloutService]) -> dict[str, Any]:
    return _alias(rollout.remove_alias(alias, actor=actor_of(request)), None)


ROUTES = [list_models, list_versions, promote, rollback, list_aliases, set_alias, remove_alias]
