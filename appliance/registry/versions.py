"""Model versions, stages and aliases: what a request's `model` field names, resolved to one stored version.

A model has numbered versions (1, 2, ...), each with its own digest, source and stage: `production` (at most one:
what the bare name serves, mirrored in the `models` table), `staging` (pulled, not yet serving) or `archived`
(served before; kept so that a rollback can return to it). The OpenAI `model` field may name:

* a model: its production version;
* an explicit version, `name@3`;
* an alias: a model's production version, a pinned version, or a split between versions (a canary), e.g.
  weights {1: 90, 2: 10}. The split is sticky: a subject (the principal's `key:<id>` or `user:<id>`) always lands
  on the same version while the weights stay, so one client does not see answers alternate between versions.

An alias named like its own model splits that model's traffic (a canary on the bare name). An alias may instead be
a bandit (`strategy` 'bandit'): its `targets`, models or `name@N` versions, share its traffic by Thompson sampling on
their ratings (appliance.registry.bandit, routed by appliance.registry.rollout); outside a request (`/v1/models`,
the stable worker) it names its first target. Every version is served by its own worker, keyed `name@N`
(`ModelVersion.ref`)."""

from __future__ import annotations

import builtins
import hashlib
import json
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Literal

import msgspec

from appliance.errors import InvalidRequest, ModelNotFound

Stage = Literal["staging", "production", "archived"]
Strategy = Literal["static", "bandit"]
MAX_TARGETS = 16
STAGES: tuple[Stage, ...] = ("staging", "production", "archived")
_COLUMNS = ("model, version, source, format, sha256, size_bytes, licence, quantisation, context_length, created_at, "
            "stage, promoted_at")
# llama.cpp's `general.file_type` (enum llama_ftype) for the quantisations one meets in practice.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
              18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
              25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
              32: "BF16", 36: "TQ1_0", 37: "TQ2_0"}


class ModelVersion(msgspec.Struct, frozen=True):
    model: str
    version: int
    source: str
    format: str
    sha256: str
    size_bytes: int
    licence: str
    quantisation: str
    context_length: int
    created_at: str
    stage: Stage
    promoted_at: str | None = None

    @property
    def ref(self) -> str:
        """`name@N`: the explicit name of this version, and the key of its worker."""
        return version_ref(self.model, self.version)


class Alias(msgspec.Struct, frozen=True):
    alias: str
    model: str
    version: int | None  # None: the model's production version
    weights: dict[int, int] | None  # version -> share of the traffic; None: all to the target
    updated_at: str
    strategy: Strategy = "static"  # 'bandit': `targets` share the traffic by their ratings
    targets: tuple[str, ...] | None = None  # a bandit's targets: models (their production version) and `name@N`
    floor: float | None = None  # a bandit's exploration floor; None: the `rollout.bandit_floor` setting


@dataclass(frozen=True)
class Route:
    """Where one request goes: the version to serve it, and how it got there."""

    ref: str
    model: str
    version: int
    alias: str | None = None
    canary: bool = False  # picked by a weight split, away from the alias's stable target


def version_ref(model: str, version: int) -> str:
    return f"{model}@{version}"


def split_ref(ref: str) -> tuple[str, int | None]:
    """`name@3` -> ("name", 3); `name` -> ("name", None); a malformed version is an unknown model (404)."""
    name, at, number = ref.rpartition("@")
    if not at:
        return ref, None
    if not number.isdigit() or not name or int(number) == 0:
        raise _not_found(ref)
    return name, int(number)


def sticky_bucket(alias: str, subject: str | None, total: int) -> int:
    """A subject's place in [0, total) for an alias: stable while the subject is, spread evenly over subjects."""
    if subject is None:  # nobody to stick to (no principal): a fresh draw each time
        return secrets.randbelow(total)
    digest = hashlib.sha256(f"{alias}\0{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % total


def pick_weighted(weights: dict[int, int], bucket: int) -> int:
    """The version whose cumulative share covers `bucket` (versions in ascending order)."""
    for version, weight in sorted(weights.items()):
        if bucket < weight:
            return version
        bucket -= weight
    return max(v for v, w in weights.items() if w > 0)


def quantisation_of(metadata: dict[str, object]) -> str:
    file_type = metadata.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        return FILE_TYPES.get(file_type, f"type {file_type}")
    return ""


def _target_not_found(target: str) -> ModelNotFound:
    return ModelNotFound(f"the target '{target}' names no servable model or version; `appliance models list` shows "
                         "the models and `appliance models versions NAME` their versions", param="targets",
                         code="model_not_found")


def _not_found(name: str) -> ModelNotFound:
    from appliance.registry.service import model_not_found

    return model_not_found(name)


class ModelVersions:
    """The versions and aliases tables; resolution of a request's `model` field. Changes that must be atomic
    (promote, alias) run inside the caller's transaction (`AuditEvent.commit`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # versions

    def _select(self, where: str, *params: object) -> builtins.list[ModelVersion]:
        """Versions matching `where`, one of this class's constant clauses (the values are bound parameters)."""
        rows = self.conn.execute(f"SELECT {_COLUMNS} FROM model_versions WHERE {where}", params)  # noqa: S608
        return [msgspec.convert(dict(r), ModelVersion) for r in rows]

    def _first(self, where: str, *params: object) -> ModelVersion | None:
        found = self._select(where, *params)
        return found[0] if found else None

    def list(self, model: str) -> builtins.list[ModelVersion]:
        return self._select("model = ? ORDER BY version", model)

    def all(self) -> builtins.list[ModelVersion]:
        return self._select("1 ORDER BY model, version")

    def find(self, model: str, version: int) -> ModelVersion | None:
        return self._first("model = ? AND version = ?", model, version)

    def get(self, model: str, version: int) -> ModelVersion:
        found = self.find(model, version)
        if found is None:
            if not self.list(model):
                raise _not_found(model)
            raise ModelNotFound(f"model '{model}' has no version {version}; `appliance models versions {model}` "
                                "lists its versions", param="model", code="version_not_found")
        return found

    def production(self, model: str) -> ModelVersion | None:
        return self._first("model = ? AND stage = 'production'", model)

    def with_digest(self, model: str, sha256: str) -> ModelVersion | None:
        return self._first("model = ? AND sha256 = ? ORDER BY version DESC", model, sha256)

    def add(self, model: str, *, source: str, format: str, sha256: str, size_bytes: int, licence: str,
            created_at: str, quantisation: str = "", context_length: int = 0) -> ModelVersion:
        """The next version of `model`: the first goes to production (and is what the name serves), a later one
        to staging until promoted. Run inside the caller's transaction, with the `models` row written for a first
        version."""
        row = self.conn.execute("SELECT COALESCE(MAX(version), 0) FROM model_versions WHERE model = ?",
                                (model,)).fetchone()
        first = self.production(model) is None
        added = ModelVersion(model, int(row[0]) + 1, source, format, sha256, size_bytes, licence, quantisation,
                             context_length, created_at, "production" if first else "staging",
                             created_at if first else None)
        self.conn.execute("INSERT INTO model_versions(model, version, source, format, sha256, size_bytes, licence, "
                          "quantisation, context_length, created_at, stage, promoted_at) VALUES "
                          "(?,?,?,?,?,?,?,?,?,?,?,?)", msgspec.structs.astuple(added))
        return added

    def set_production(self, model: str, version: int, now: str) -> ModelVersion | None:
        """Make `version` the production one, in the caller's transaction: the previous production version is
        archived (kept for a rollback), the `models` row mirrors the new one, and canaries of this model that
        split traffic to it are complete (their aliases follow production again). Returns the previous one."""
        target = self.get(model, version)
        previous = self.production(model)
        if previous is not None:
            self.conn.execute("UPDATE model_versions SET stage = 'archived' WHERE model = ? AND version = ?",
                              (model, previous.version))
        self.conn.execute("UPDATE model_versions SET stage = 'production', promoted_at = ? WHERE model = ? AND "
                          "version = ?", (now, model, version))
        self.conn.execute("UPDATE models SET source = ?, format = ?, sha256 = ?, size_bytes = ?, licence = ?, "
                          "created_at = ? WHERE name = ?", (target.source, target.format, target.sha256,
                                                             target.size_bytes, target.licence, target.created_at,
                                                             model))
        for alias in self.aliases_of(model):
            if alias.weights is not None and version in alias.weights:
                self._write_alias(alias.alias, model, alias.version, None, now)
        return previous

    def set_stage(self, model: str, version: int, stage: Stage) -> None:
        if stage == "production":
            raise ValueError("promote a version to production with set_production")
        self.conn.execute("UPDATE model_versions SET stage = ? WHERE model = ? AND version = ?",
                          (stage, model, version))

    def previous_production(self, model: str) -> ModelVersion | None:
        """The archived version that was in production most recently: where a rollback returns to."""
        return self._first("model = ? AND stage = 'archived' AND promoted_at IS NOT NULL "
                           "ORDER BY promoted_at DESC, version DESC LIMIT 1", model)

    def remove_model(self, model: str) -> None:
        """Forget every version of `model` and the aliases that route to it (in the caller's transaction)."""
        self.conn.execute("DELETE FROM model_versions WHERE model = ?", (model,))
        for bandit in self.bandits_of(model):  # a bandit that loses an arm goes with it
            self.conn.execute("DELETE FROM model_aliases WHERE alias = ?", (bandit.alias,))
        self.conn.execute("DELETE FROM model_aliases WHERE model = ?", (model,))

    def digest_in_use(self, sha256: str) -> bool:
        return self.conn.execute("SELECT 1 FROM model_versions WHERE sha256 = ?", (sha256,)).fetchone() is not None

    # aliases

    def aliases(self) -> builtins.list[Alias]:
        return [self._alias(r) for r in self.conn.execute("SELECT * FROM model_aliases ORDER BY alias")]

    def aliases_of(self, model: str) -> builtins.list[Alias]:
        rows = self.conn.execute("SELECT * FROM model_aliases WHERE model = ? ORDER BY alias", (model,))
        return [self._alias(r) for r in rows]

    def alias(self, name: str) -> Alias | None:
        row = self.conn.execute("SELECT * FROM model_aliases WHERE alias = ?", (name,)).fetchone()
        return self._alias(row) if row else None

    @staticmethod
    def _alias(row: sqlite3.Row) -> Alias:
        weights = json.loads(row["weights"]) if row["weights"] else None
        targets = tuple(json.loads(row["targets"])) if row["targets"] else None
        return Alias(row["alias"], row["model"], row["version"],
                     {int(v): int(w) for v, w in weights.items()} if weights else None, row["updated_at"],
                     row["strategy"], targets, row["floor"])

    def set_alias(self, alias: str, model: str, version: int | None, weights: dict[int, int] | None,
                  now: str) -> Alias:
        """Point `alias` at a model (its production version, or `version`), optionally split by `weights`;
        checked: the versions exist and are not archived, the weights are positive and sum to 100."""
        if self.production(model) is None:
            raise _not_found(model)
        if alias != model and self.conn.execute("SELECT 1 FROM models WHERE name = ?", (alias,)).fetchone():
            raise InvalidRequest(f"'{alias}' is a model's name; an alias may share a name only with its own model "
                                 "(to split that model's traffic)", param="alias", code="alias_is_a_model")
        for v in [version] if version is not None else []:
            self._servable(model, v)
        if weights is not None:
            if sum(weights.values()) != 100 or any(w < 0 for w in weights.values()) or len(weights) < 2:
                raise InvalidRequest(f"weights {weights} must name at least two versions with shares summing to "
                                     "100, e.g. {1: 90, 2: 10}", param="weights", code="invalid_weights")
            for v in weights:
                self._servable(model, v)
        self._write_alias(alias, model, version, weights, now)
        found = self.alias(alias)
        assert found is not None
        return found

    def _servable(self, model: str, version: int) -> ModelVersion:
        found = self.get(model, version)
        if found.stage == "archived":
            raise InvalidRequest(f"{found.ref} is archived; promote it back first, or route to a staging or the "
                                 "production version", param="version", code="version_archived")
        return found

    def _write_alias(self, alias: str, model: str, version: int | None, weights: dict[int, int] | None,
                     now: str) -> None:
        encoded = json.dumps({str(v): w for v, w in sorted(weights.items())}) if weights else None
        self._upsert(alias, model, version, encoded, now, "static", None, None)

    def _upsert(self, alias: str, model: str, version: int | None, weights: str | None, now: str,
                strategy: Strategy, targets: str | None, floor: float | None) -> None:
        self.conn.execute("INSERT INTO model_aliases(alias, model, version, weights, updated_at, strategy, targets, "
                          "floor) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(alias) DO UPDATE SET model = excluded.model, "
                          "version = excluded.version, weights = excluded.weights, updated_at = excluded.updated_at, "
                          "strategy = excluded.strategy, targets = excluded.targets, floor = excluded.floor",
                          (alias, model, version, weights, now, strategy, targets, floor))

    def set_bandit(self, alias: str, targets: builtins.list[str], floor: float | None, now: str) -> Alias:
        """Make `alias` a bandit over `targets` (models or `name@N`, at least two, each servable), checked here;
        the floor is checked by the caller (it knows the setting)."""
        if not isinstance(targets, builtins.list) or not 2 <= len(targets) <= MAX_TARGETS:
            raise InvalidRequest(f"a bandit needs between 2 and {MAX_TARGETS} targets (models or name@N versions), "
                                 'e.g. {"strategy": "bandit", "targets": ["my-model@1", "my-model@2"]}',
                                 param="targets", code="invalid_targets")
        if len(set(targets)) != len(targets):
            raise InvalidRequest(f"the targets {targets} name one more than once; name each once",
                                 param="targets", code="invalid_targets")
        models = []
        for target in targets:
            try:
                model, pinned = split_ref(target)
            except ModelNotFound:
                raise _target_not_found(target) from None
            if self.production(model) is None:
                raise _target_not_found(target)
            if pinned is not None:
                if self.find(model, pinned) is None:
                    raise _target_not_found(target)
                self._servable(model, pinned)
            models.append(model)
        if alias not in models and self.conn.execute("SELECT 1 FROM models WHERE name = ?", (alias,)).fetchone():
            raise InvalidRequest(f"'{alias}' is a model's name; an alias may share a name only with a model it routes "
                                 "to", param="alias", code="alias_is_a_model")
        first_model, first_version = split_ref(targets[0])
        self._upsert(alias, first_model, first_version, None, now, "bandit", json.dumps(targets), floor)
        found = self.alias(alias)
        assert found is not None
        return found

    def target_route(self, target: str) -> Route | None:
        """Where a bandit target sends a request now: a model's production version, or `name@N` (archived since
        the alias was set: still served, as a pinned alias is; None when gone)."""
        model, pinned = split_ref(target)
        found = self.production(model) if pinned is None else self.find(model, pinned)
        if found is None:
            return None
        return Route(found.ref, model, found.version)

    def routes_to(self, model: str, version: int) -> builtins.list[str]:
        """The aliases that name `model@version` itself: pinned to it, splitting traffic to it, or a bandit target."""
        ref = version_ref(model, version)
        return [a.alias for a in self.aliases()
                if (a.model == model and a.strategy == "static"
                    and (a.version == version or (a.weights and version in a.weights)))
                or ref in (a.targets or ())]

    def bandits_of(self, model: str) -> builtins.list[Alias]:
        """Bandit aliases with a target of `model` (bare or a version of it)."""
        return [a for a in self.aliases() if a.targets and any(split_ref(t)[0] == model for t in a.targets)]

    def remove_alias(self, alias: str) -> Alias:
        found = self.alias(alias)
        if found is None:
            raise ModelNotFound(f"no alias '{alias}'; `appliance models aliases` lists them", param="alias",
                                code="alias_not_found")
        self.conn.execute("DELETE FROM model_aliases WHERE alias = ?", (alias,))
        return found

    # resolution

    def resolve(self, name: str, subject: str | None = None, *, split: bool = True) -> Route:
        """The version that serves a request naming `name`, for `subject` (canary splits stick to it); with
        `split` off, an alias's stable target whatever its weights."""
        model, version = split_ref(name)
        if version is not None:
            found = self.find(model, version)
            if found is None or found.stage == "archived":
                raise _not_found(name)
            return Route(found.ref, model, version)
        alias = self.alias(name)
        if alias is not None:
            stable = alias.version
            if stable is None:
                current = self.production(alias.model)
                if current is None:
                    raise _not_found(name)
                stable = current.version
            if alias.weights and split:
                picked = pick_weighted(alias.weights, sticky_bucket(name, subject, sum(alias.weights.values())))
                return Route(version_ref(alias.model, picked), alias.model, picked, name, canary=picked != stable)
            return Route(version_ref(alias.model, stable), alias.model, stable, name)
        current = self.production(name)
        if current is None:
            raise _not_found(name)
        return Route(current.ref, name, current.version)

    def worker_key(self, name: str) -> str:
        """The worker that serves `name` outside any split (a bare model, an alias's stable target, `name@N`);
        `name` itself when it names nothing, so that the caller's lookup gives the usual 404."""
        try:
            return self.resolve(name, split=False).ref
        except ModelNotFound:
            return name
