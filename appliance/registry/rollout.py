"""Safe model upgrades: blue-green promote, rollback, aliases with canary splits and automatic rollback.

Promote (blue-green): the new version's worker is loaded and warmed up next to the old one while the old one keeps
serving; the switch is one SQLite transaction (stages, the `models` row, the audit record), so every request
resolves to the old version or the new one, never to nothing; then the old worker is drained (its requests finish)
and unloaded. No request fails during the switch.

Canary: an alias splits its traffic, e.g. {1: 90, 2: 10}, sticky per subject. Every request a worker serves is
observed (`observe`, the pool's `on_request`) into its version's window of the last `rollout.window_seconds`
(`window_stats`, which the admin API shows for every version, so a canary can be compared with production beside
it); when the canary version's error rate or p95 latency over its window passes its threshold (after
`rollout.min_requests` requests), the split ends by itself: the alias sends everything to its stable version again,
the canary's worker is drained, and the audit log records `model.rollback` by `supervisor` with the numbers. A
version's window starts afresh when it becomes a canary, so that it is judged on its canary traffic alone. Every
transition is audited.

Canaries are judged on quality too: every rating (`rated`, from POST /api/feedback) reads a sequential test
(appliance.registry.quality) of the canary's share of -1 ratings against its stable version's, both counted since
the split was set; when the canary is worse, it is rolled back as above (`model.rollback` by `supervisor`, with
`trigger` 'quality', the counts, the e-value and its threshold). The test's state shows in GET /api/aliases.

Bandit aliases (appliance.registry.bandit) route each request by Thompson sampling over their targets' ratings since
the alias was set (read from the `feedback` table again after each rating) and failed requests (observed here, in
memory); their shares show in GET /api/aliases and as the `appliance_alias_share` gauge.

Without a running server (the CLI), a promote or rollback is only the switch: the next request loads the version."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
from prometheus_client import CollectorRegistry, Gauge

from appliance.audit import AuditLog, audited
from appliance.config import RolloutSettings
from appliance.errors import ApplianceError, InvalidRequest, ModelUnavailable
from appliance.logs import get_logger
from appliance.registry import bandit
from appliance.registry.quality import QualityTest, QualityVerdict, Ratings
from appliance.registry.service import ModelRegistry, valid_model_name
from appliance.registry.versions import Alias, ModelVersion, ModelVersions, Route, Strategy, split_ref, version_ref
from appliance.supervisor.pool import WorkerPool

log = get_logger(__name__)
WARM_UP = {"prompt": "Hello", "max_tokens": 1, "temperature": 0}
WINDOW_CAP = 10_000  # requests kept per version's window: under heavy traffic the window is the last this many


@dataclass(frozen=True)
class Transition:
    """What a promote or rollback did."""

    model: str
    from_version: int | None
    to_version: int | None
    drained: bool = True
    aliases: tuple[str, ...] = ()  # canary splits ended

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "from_version": self.from_version, "to_version": self.to_version,
                "drained": self.drained, "aliases": list(self.aliases)}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class WindowStats:
    """A version's requests over the rollout window: how many, how many failed, and the p95 request time."""

    requests: int
    errors: int
    error_rate: float | None
    p95_seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "error_rate": self.error_rate,
                "p95_seconds": self.p95_seconds}


@dataclass(frozen=True)
class Arm:
    """One target of a bandit alias as routed now: the version it names and what its responses got."""

    target: str
    route: Route
    stats: bandit.ArmStats


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else 0.0


class RolloutService:
    def __init__(self, registry: ModelRegistry, pool: WorkerPool | None, settings: RolloutSettings,
                 audit: AuditLog | None = None, metrics: CollectorRegistry | None = None,
                 rng: np.random.Generator | None = None) -> None:
        self.registry = registry
        self.versions: ModelVersions = registry.versions
        self.pool = pool
        self.settings = settings
        self.audit = audit
        self._windows: dict[str, deque[tuple[float, bool, float]]] = {}  # worker key -> recent requests
        self._canaries_seen: tuple[float, frozenset[str]] = (-math.inf, frozenset())
        self._judged: frozenset[str] = frozenset()  # the canaries as last found (a new one starts a fresh window)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()  # one transition at a time
        self.quality = QualityTest(settings.quality_alpha, settings.quality_tau, settings.quality_margin,
                                   settings.quality_min_ratings)
        self.rng = rng or np.random.default_rng()
        self._bandits_seen: tuple[float, dict[str, Alias]] = (-math.inf, {})
        self._ratings_generation = 0  # bumped by every rating: bandits read their counts again
        self._arms: dict[str, tuple[int, float, list[tuple[str, Route, Ratings]]]] = {}  # alias -> routed targets
        self._arm_errors: dict[str, dict[str, int]] = {}  # bandit alias -> version -> failed requests since set
        self._share_gauge = Gauge("appliance_alias_share", "A bandit alias's expected share of traffic per target "
                                  "(Thompson sampling on ratings, with the exploration floor).", ["alias", "target"],
                                  registry=metrics) if metrics is not None else None

    def route(self, name: str, principal: Any = None) -> Route:
        """The version that serves `name` for this principal (canary splits stick to its subject; a bandit alias
        draws per request)."""
        found = self._bandits().get(name)
        if found is not None:
            arms = self.bandit_arms(found)
            if arms:
                arm = arms[bandit.pick([a.stats for a in arms], self.floor_of(found, len(arms)), self.rng)]
                return Route(arm.route.ref, arm.route.model, arm.route.version, name)
        return self.versions.resolve(name, getattr(principal, "subject", None))

    # blue-green

    async def promote(self, model: str, version: int, *, actor: str) -> Transition:
        """Serve `version` as `model`'s production version: load and warm it up, switch, drain the old one."""
        async with self._lock:
            with audited(self.audit, actor, "model.promote", model, version=version) as event:
                target = self.versions.get(model, version)
                current = self.versions.production(model)
                if current is not None and current.version == version:
                    raise InvalidRequest(f"{target.ref} is already in production", param="version",
                                         code="already_production")
                event.details["from_version"] = current.version if current else None
                await self._warm_up(target, current)
                with event.commit():
                    self.versions.set_production(model, version, _now())
                self._switched()
            drained = await self._retire(current) if current is not None else True
        log.info("model.promoted", model=model, version=version, previous=getattr(current, "version", None))
        return Transition(model, getattr(current, "version", None), version, drained)

    async def rollback(self, model: str, *, actor: str) -> Transition:
        """End `model`'s canary splits if it has any; else return production to the version served before
        (blue-green, as a promote), the current one going back to staging."""
        async with self._lock:
            if self._canaries(model):
                return await self._end_canaries(model, actor=actor, reason="rollback requested")
            with audited(self.audit, actor, "model.rollback", model) as event:
                current = self.versions.production(model)
                if current is None:
                    self.registry.get(model)  # the usual 404
                    raise InvalidRequest(f"model '{model}' has no production version", code="no_production")
                previous = self.versions.previous_production(model)
                if previous is None:
                    raise InvalidRequest(f"model '{model}' has no earlier production version to return to; "
                                         f"`appliance models versions {model}` lists its versions",
                                         code="nothing_to_roll_back")
                event.details.update(from_version=current.version, to_version=previous.version)
                await self._warm_up(previous, current)
                with event.commit():
                    self.versions.set_production(model, previous.version, _now())
                    self.versions.set_stage(model, current.version, "staging")
                self._switched()
            drained = await self._retire(current)
        return Transition(model, current.version, previous.version, drained)

    async def _warm_up(self, target: ModelVersion, current: ModelVersion | None) -> None:
        """Load `target` and send it one tiny completion; on failure unload it and say production is unchanged."""
        if self.pool is None:
            return
        try:
            async with self.pool.acquire(target.ref) as worker:
                if target.format != "remote":
                    response = await worker.client.post("/v1/completions", json={"model": target.model, **WARM_UP})
                    if response.status_code != 200:
                        raise ModelUnavailable(f"its warm-up completion got HTTP {response.status_code}")
        except (ApplianceError, httpx.HTTPError) as exc:
            await self.pool.drain(target.ref, 0)
            reason = exc.message if isinstance(exc, ApplianceError) else type(exc).__name__
            stays = f"version {current.version} keeps serving" if current else "nothing was switched"
            raise ModelUnavailable(f"{target.ref} could not be loaded and warmed up ({reason[:300]}); {stays}",
                                   code="promote_failed") from exc

    def _switched(self) -> None:
        if self.pool is not None:
            self.pool.repin()

    async def _retire(self, old: ModelVersion) -> bool:
        """Drain and unload a version's worker, unless an alias still routes to it."""
        if self.pool is None or self._still_routed(old.model, old.version):
            return True
        return await self.pool.drain(old.ref, self.settings.drain_seconds)

    def _still_routed(self, model: str, version: int) -> bool:
        current = self.versions.production(model)
        if current is not None and current.version == version:
            return True
        return bool(self.versions.routes_to(model, version))

    # aliases and canaries

    def set_alias(self, alias: str, target: str | None = None, *, canary: int | None = None, weight: int = 10,
                  strategy: str = "static", targets: list[str] | None = None, floor: float | None = None,
                  actor: str) -> Alias:
        """Point `alias` at `target` (a model: its production version; or `name@N`); with `canary`, send `weight`
        percent of its traffic (sticky per subject) to that version instead. With strategy 'bandit', share its
        traffic between `targets` by their ratings instead (`floor`: each target's least share). A change of
        strategy is in the audit record (`strategy`, `from_strategy`)."""
        previous = self.versions.alias(alias)
        bandit_alias = strategy == "bandit"
        with audited(self.audit, actor, "model.alias", alias, to=target, canary=canary,
                     weight=weight if canary is not None else None, strategy=strategy,
                     from_strategy=previous.strategy if previous else None,
                     **({"targets": targets, "floor": floor} if bandit_alias else {})) as event:
            valid_model_name(alias)
            _check_strategy(strategy, target, canary, targets, floor)
            if bandit_alias:
                assert targets is not None
                if floor is not None and floor > bandit.max_floor(len(targets)):
                    raise InvalidRequest(f"a floor of {floor} for {len(targets)} targets leaves nothing to learn: each "
                                         f"target's least share can be at most 1/{len(targets)}", param="floor",
                                         code="invalid_floor")
                with event.commit():
                    found = self.versions.set_bandit(alias, targets, floor, _now())
                self._forget_bandit(alias)
                return found
            assert target is not None
            model, pinned = split_ref(target)
            weights = None
            if canary is not None:
                if not 0 < weight < 100:
                    raise InvalidRequest(f"a canary's weight is a percentage between 1 and 99, not {weight}",
                                         param="weight", code="invalid_weight")
                stable = pinned or getattr(self.versions.production(model), "version", None)
                if stable is None:
                    self.registry.get(model)
                    raise InvalidRequest(f"model '{model}' has no production version", code="no_production")
                if canary == stable:
                    raise InvalidRequest(f"version {canary} is already the alias's target; name another version "
                                         "as the canary", param="canary", code="invalid_canary")
                weights = {stable: 100 - weight, canary: weight}
            with event.commit():
                found = self.versions.set_alias(alias, model, pinned, weights, _now())
        if canary is not None:
            self._windows.pop(version_ref(model, canary), None)  # a fresh window for the new canary
        self._canaries_seen = (-math.inf, frozenset())
        self._forget_bandit(alias)
        return found

    def remove_alias(self, alias: str, *, actor: str) -> Alias:
        with audited(self.audit, actor, "model.unalias", alias) as event, event.commit():
            removed = self.versions.remove_alias(alias)
        self._forget_bandit(alias)
        return removed

    def _canaries(self, model: str) -> list[Alias]:
        return [a for a in self.versions.aliases_of(model) if a.weights]

    async def _end_canaries(self, model: str, *, actor: str, reason: str, version: int | None = None,
                            **details: Any) -> Transition:
        """Send every split alias of `model` (those giving `version` a share, when named) to its stable target
        alone, then drain the canary versions' workers."""
        with audited(self.audit, actor, "model.rollback", model, reason=reason, **details) as event:
            ended = [a for a in self._canaries(model) if version is None or (a.weights and version in a.weights)]
            canaries = sorted({v for a in ended for v in a.weights or {} if v != self._stable(a)})
            event.details.update(aliases=[a.alias for a in ended], canary_versions=canaries)
            now = _now()
            with event.commit():
                for a in ended:
                    self.versions.set_alias(a.alias, a.model, a.version, None, now)
        self._canaries_seen = (-math.inf, frozenset())
        drained = True
        for v in canaries:
            self._windows.pop(version_ref(model, v), None)
            found = self.versions.find(model, v)
            if found is not None:
                drained = await self._retire(found) and drained
        log.warning("model.canary_ended", model=model, versions=canaries, reason=reason)
        return Transition(model, canaries[0] if canaries else None, None, drained, tuple(a.alias for a in ended))

    def _stable(self, alias: Alias) -> int | None:
        return alias.version or getattr(self.versions.production(alias.model), "version", None)

    # the canary monitor

    def canary_keys(self) -> frozenset[str]:
        """The worker keys of versions that get a canary share of some alias; read at most once a second (a split
        set by the CLI, another process, is noticed within that)."""
        at, keys = self._canaries_seen
        if time.monotonic() - at < 1.0:
            return keys
        found = frozenset(version_ref(a.model, v) for a in self.versions.aliases() if a.weights
                          for v in a.weights if v != self._stable(a))
        for key in found - self._judged:  # a new canary: judged on its canary traffic alone
            self._windows.pop(key, None)
        self._canaries_seen, self._judged = (time.monotonic(), found), found
        return found

    def _window(self, key: str, now: float) -> deque[tuple[float, bool, float]] | None:
        """Worker `key`'s requests within the window (older ones dropped)."""
        window = self._windows.get(key)
        while window and window[0][0] < now - self.settings.window_seconds:
            window.popleft()
        return window

    def window_stats(self, key: str) -> WindowStats:
        """What worker `key` (`name@N`) served over the last `rollout.window_seconds` (at most the last WINDOW_CAP
        requests): every version has one, canary or not."""
        window = self._window(key, time.monotonic())
        if not window:
            return WindowStats(0, 0, None, None)
        errors = sum(1 for _, failed, _ in window if failed)
        return WindowStats(len(window), errors, round(errors / len(window), 4),
                           round(p95([d for _, _, d in window]), 4))

    def observe(self, key: str, failed: bool, seconds: float) -> None:
        """One request served by worker `key` (`name@N`), kept in its window; rolls a canary back when it passes a
        threshold (only canaries are judged)."""
        canary = key in self.canary_keys()
        now = time.monotonic()
        window = self._window(key, now)
        if window is None:
            window = self._windows[key] = deque(maxlen=WINDOW_CAP)
        window.append((now, failed, seconds))
        if failed:
            self._count_error(key)
        if not canary:
            return
        s = self.settings
        if len(window) < s.min_requests or self._lock.locked():
            return
        errors = sum(1 for _, f, _ in window if f)
        rate, latency = errors / len(window), p95([d for _, _, d in window])
        if rate > s.max_error_rate:
            reason = f"error rate {rate:.2f} > {s.max_error_rate:.2f} over {len(window)} requests"
        elif latency > s.max_p95_seconds:
            reason = f"p95 latency {latency:.2f}s > {s.max_p95_seconds:.2f}s over {len(window)} requests"
        else:
            return
        model, version = split_ref(key)
        if version is None or not any(version != self._stable(a) for a in self._canaries(model)
                                      if a.weights and version in a.weights):
            return  # not a canary: thresholds judge canaries only
        window.clear()
        self._spawn(self._auto_rollback(model, version, reason, trigger="errors" if rate > s.max_error_rate
                                        else "latency", error_rate=round(rate, 4), p95_seconds=round(latency, 3),
                                        window_seconds=self.settings.window_seconds))

    async def _auto_rollback(self, model: str, version: int, reason: str, **details: Any) -> None:
        async with self._lock:
            if not any(version != self._stable(a) for a in self._canaries(model) if a.weights and version in a.weights):
                return  # ended meanwhile (another breach, an admin)
            try:
                await self._end_canaries(model, actor="supervisor", reason=f"canary {reason}", version=version,
                                         automatic=True, **details)
            except Exception:  # logged: the split stays, and the next breach tries again
                log.exception("model.auto_rollback_failed", model=model, version=version)

    # canaries judged on quality

    def rated(self, model: str, version: int) -> None:
        """A response served by `model@version` was rated (POST /api/feedback): bandits read their counts again, and
        when that version is a canary, the quality test is read and a worse canary rolled back."""
        self._ratings_generation += 1
        verdict = self.quality_verdict(model, version)
        if verdict is None or verdict.decision != "worse":
            return
        c, p = verdict.canary, verdict.production
        reason = (f"share of -1 ratings {c.down}/{c.total} is worse than production's {p.down}/{p.total} "
                  f"(e-value {verdict.e_value:.1f} >= {self.quality.threshold:g})")
        log.warning("model.canary_worse", model=model, version=version, e_value=verdict.e_value)
        try:
            self._spawn(self._auto_rollback(model, version, reason, trigger="quality", **_quality_details(verdict)))
        except RuntimeError:  # no event loop (a script): the next rating in a server tries again
            log.warning("model.auto_rollback_skipped", model=model, version=version)

    def quality_verdict(self, model: str, version: int) -> QualityVerdict | None:
        """The quality test of canary `model@version` against its alias's stable version, on the ratings of both
        since the split was set (None when it is no canary)."""
        splits = [a for a in self._canaries(model) if a.weights and version in a.weights and version != self._stable(a)]
        if not splits:
            return None
        stable = self._stable(splits[0])
        ratings = self._ratings_since(min(a.updated_at for a in splits))
        return self.quality.judge(ratings.get((model, version), Ratings()),
                                  ratings.get((model, stable or 0), Ratings()))

    def _ratings_since(self, since: str) -> dict[tuple[str, int], Ratings]:
        """Ratings per version given since `since` (to the second: a rating's time has no fraction)."""
        rows = self.versions.conn.execute("SELECT model, version, SUM(rating = 1), SUM(rating = -1) FROM feedback "
                                          "WHERE created_at >= ? GROUP BY model, version", (since[:19],))
        return {(r[0], int(r[1])): Ratings(int(r[2]), int(r[3])) for r in rows}

    # bandits

    def _bandits(self) -> dict[str, Alias]:
        """The bandit aliases, read at most once a second (one set by the CLI is noticed within that)."""
        at, found = self._bandits_seen
        if time.monotonic() - at >= 1.0:
            found = {a.alias: a for a in self.versions.aliases() if a.strategy == "bandit"}
            self._bandits_seen = (time.monotonic(), found)
        return found

    def _forget_bandit(self, alias: str) -> None:
        self._bandits_seen = (-math.inf, {})
        self._arms.pop(alias, None)
        self._arm_errors.pop(alias, None)

    def floor_of(self, alias: Alias, arms: int) -> float:
        floor = self.settings.bandit_floor if alias.floor is None else alias.floor
        return min(floor, bandit.max_floor(arms))

    def bandit_arms(self, alias: Alias) -> list[Arm]:
        """The alias's targets that route somewhere now, each with its ratings since the alias was set (read again
        after any rating, and at least once a second, when a production version may have changed) and failures."""
        now = time.monotonic()
        cached = self._arms.get(alias.alias)
        if cached is None or cached[0] != self._ratings_generation or now - cached[1] >= 1.0:
            ratings = self._ratings_since(alias.updated_at)
            routed = [(t, r) for t in alias.targets or () if (r := self.versions.target_route(t)) is not None]
            cached = (self._ratings_generation, now,
                      [(t, r, ratings.get((r.model, r.version), Ratings())) for t, r in routed])
            self._arms[alias.alias] = cached
        errors = self._arm_errors.get(alias.alias, {})
        return [Arm(t, r, bandit.ArmStats(rated.up, rated.down, errors.get(r.ref, 0))) for t, r, rated in cached[2]]

    def _count_error(self, key: str) -> None:
        """A failed request of worker `key` counts against every bandit arm it serves."""
        for alias, (_, _, arms) in self._arms.items():
            if any(r.ref == key for _, r, _ in arms):
                errors = self._arm_errors.setdefault(alias, {})
                errors[key] = errors.get(key, 0) + 1

    def alias_status(self, alias: Alias) -> dict[str, Any]:
        """What GET /api/aliases adds to an alias: a bandit's arms and shares, a canary's quality test."""
        if alias.strategy == "bandit":
            arms = self.bandit_arms(alias)
            floor = self.floor_of(alias, max(1, len(arms)))
            shares = bandit.shares([a.stats for a in arms], floor, self.rng)
            return {"floor": floor, "shares": {a.target: round(x, 4) for a, x in zip(arms, shares, strict=True)},
                    "arms": [{"target": a.target, "served": a.route.ref, "up": a.stats.up, "down": a.stats.down,
                              "errors": a.stats.errors, "share": round(x, 4)}
                             for a, x in zip(arms, shares, strict=True)]}
        stable = self._stable(alias)
        canaries = [v for v in alias.weights or {} if v != stable]
        verdicts = {v: self.quality_verdict(alias.model, v) for v in canaries}
        return {"quality": {str(v): q.to_dict() for v, q in verdicts.items() if q is not None}} if canaries else {}

    def refresh_metrics(self) -> None:
        """Set the share gauge from the bandits' current state (before /metrics renders)."""
        if self._share_gauge is None:
            return
        self._share_gauge.clear()
        for alias in self._bandits().values():
            for target, share in self.alias_status(alias)["shares"].items():
                self._share_gauge.labels(alias.alias, target).set(share)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _quality_details(verdict: QualityVerdict) -> dict[str, Any]:
    return {"canary_ratings": {"up": verdict.canary.up, "down": verdict.canary.down},
            "production_ratings": {"up": verdict.production.up, "down": verdict.production.down},
            "difference": round(verdict.difference or 0.0, 4), "e_value": round(verdict.e_value, 3),
            "threshold": verdict.test.threshold, "alpha": verdict.test.alpha, "margin": verdict.test.margin}


def _check_strategy(strategy: str, target: str | None, canary: int | None, targets: list[str] | None,
                    floor: float | None) -> None:
    """The fields an alias body may combine: a target (with an optional canary) for 'static', targets (with an
    optional floor) for 'bandit'."""
    strategies: tuple[Strategy, ...] = ("static", "bandit")
    if strategy not in strategies:
        raise InvalidRequest(f"strategy must be 'static' (a target, optionally with a canary) or 'bandit' (targets "
                             f"shared by their ratings), not {strategy!r}", param="strategy", code="invalid_strategy")
    if strategy == "bandit":
        if target is not None or canary is not None:
            raise InvalidRequest("a bandit alias takes `targets` (and an optional `floor`), not `target` or `canary`; "
                                 'send e.g. {"strategy": "bandit", "targets": ["my-model@1", "my-model@2"]}',
                                 param="target" if target is not None else "canary", code="invalid_body")
        if targets is None:
            raise InvalidRequest('a bandit alias needs `targets`, e.g. {"strategy": "bandit", "targets": '
                                 '["my-model@1", "my-model@2"]}', param="targets", code="invalid_targets")
        if floor is not None and not 0 <= floor <= 1:
            raise InvalidRequest(f"floor is each target's least share of the traffic, between 0 and 1/targets, not "
                                 f"{floor}", param="floor", code="invalid_floor")
        return
    if targets is not None or floor is not None:
        raise InvalidRequest("`targets` and `floor` belong to a bandit alias; add \"strategy\": \"bandit\", or name "
                             "one `target`", param="targets" if targets is not None else "floor", code="invalid_body")
    if target is None:
        raise InvalidRequest('an alias needs a `target`, e.g. {"target": "my-model"}, or {"strategy": "bandit", '
                             '"targets": [...]}', param="target", code="invalid_body")
