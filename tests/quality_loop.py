"""The quality loop without HTTP, for unit tests and tests/benchmarks/bench_bandit.py: the real registry (SQLite,
stored GGUFs, audit log), the real RolloutService routing requests and the real FeedbackService and ledger taking
ratings of them. A request here is its routing, its ledger entry and (when asked) its rating: no worker runs."""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry

from appliance.audit import AuditLog
from appliance.auth.keys import Principal
from appliance.auth.rbac import Rbac
from appliance.config import RolloutSettings
from appliance.crypto.keyring import KeyRing
from appliance.datadir import DataDir
from appliance.feedback.ledger import ResponseLedger
from appliance.feedback.service import FeedbackService
from appliance.privacy.service import Privacy
from appliance.registry.catalog import Catalog
from appliance.registry.rollout import RolloutService
from appliance.registry.service import ModelRegistry
from appliance.registry.store import ModelStore
from appliance.registry.versions import Route
from tests.unit.ggufs import make_gguf

CLIENT = Principal("c1", "client", "user")


def _no_privacy() -> Privacy:
    raise AssertionError("no comment is given here")


class QualityLoop(contextlib.AbstractContextManager["QualityLoop"]):
    """Model `m` with `versions` versions (1 in production, the rest staging), its rollout and its feedback."""

    def __init__(self, folder: Path, *, versions: int = 2, seed: int | None = None, **settings: Any) -> None:
        self.data = DataDir(folder / "data")
        self.data.initialise()
        self.conn: sqlite3.Connection = self.data.connect()
        self.audit = AuditLog(self.conn)
        self.registry = ModelRegistry(self.conn, ModelStore(self.data.models, self.data.tmp, KeyRing(self.data.keys),
                                                            self.data.wrapped_keys), Catalog(models={}),
                                      audit=self.audit)
        for i in range(1, versions + 1):
            self.registry.pull(f"file:{make_gguf(folder / f'v{i}.gguf')}", name="m")
        self.metrics = CollectorRegistry()
        self.rollout = RolloutService(self.registry, None, RolloutSettings(**settings), self.audit, self.metrics,
                                      rng=np.random.default_rng(seed))
        self.ledger = ResponseLedger(self.conn)
        self.feedback = FeedbackService(self.conn, self.ledger, _no_privacy, Rbac.load(), 3600, self.metrics)
        self.feedback.on_rating = self.rollout.rated
        self._ids = itertools.count()

    def serve(self, model: str, principal: Principal = CLIENT) -> tuple[str, Route]:
        """Route one request for `model` and note its response (as the gateway does); its id and route."""
        route = self.rollout.route(model, principal)
        response = f"chatcmpl-{next(self._ids)}"
        self.ledger.note(response, principal, route.ref)
        return response, route

    def rate(self, response: str, rating: int, principal: Principal = CLIENT) -> dict[str, Any]:
        return self.feedback.submit(msgspec.json.encode({"response_id": response, "rating": rating}), principal)

    def forget_ratings(self) -> None:
        """A clean slate for the next run on the same registry."""
        self.ledger.flush()
        self.conn.execute("DELETE FROM feedback")
        self.conn.execute("DELETE FROM served_responses")

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [r for r in self.audit.export() if r["action"] == action]

    def __exit__(self, *_: object) -> None:
        self.conn.close()
