"""The `remote` engine: a model served by an OpenAI-compatible upstream (another appliance, a vLLM cluster, KServe,
Ray Serve), proxied by the gateway with its auth, quotas, cache and audit in front (DESIGN section 6).

The upstream's API key is a secret: it lives in a 0600 file under the data dir's `keys/remote/`, goes only into the
Authorization header of requests to that upstream, and is never logged or shown."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from appliance.config import RemoteSettings
from appliance.crypto.secret_files import SecretFiles
from appliance.engines.remote_pool import PoolClient, PoolTransport, UpstreamPool
from appliance.errors import RegistryError
from appliance.logs import get_logger
from appliance.observability.metrics import Metrics
from appliance.registry.remote import RemoteSpec
from appliance.supervisor.process import WorkerStartError

log = get_logger(__name__)


class RemoteCredentials(SecretFiles):
    """Upstream API keys, one 0600 file per model in a 0700 folder (keys/remote/<model>.key): one key a line, one per
    upstream in the order of the model's URLs, or a single key for all of them (the shape an earlier version wrote)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, "upstream API key")

    def save_all(self, model: str, keys: list[str]) -> None:
        self.save_lines(model, keys)

    def load_all(self, model: str) -> list[str]:
        return self.load_lines(model)


def keys_from_lines(lines: list[str], upstreams: int) -> list[str]:
    """The keys given on stdin: one a line for each upstream, or one for all; blank lines do not count."""
    keys = [line.strip() for line in lines if line.strip()]
    if len(keys) not in (0, 1, upstreams):
        raise RegistryError(f"{len(keys)} API keys for {upstreams} upstreams; give one key per --url, a line each, "
                            "or one key for all", param="api_key")
    return keys


class RemoteWorker:
    """The Worker protocol over a pool of upstreams: nothing to spawn; ready once one of them lists the model. Its
    `client` routes every request over the pool (`appliance.engines.remote_pool`)."""

    pid = None
    engine = "remote"

    def __init__(self, model: str, spec: RemoteSpec, keys: list[str], settings: RemoteSettings, *,
                 request_timeout: float, queue_timeout: float = 120.0, metrics: Metrics | None = None) -> None:
        self.model = model
        self.spec = spec
        self.exited = asyncio.Event()
        self.stopping = False
        self._error = ""
        self.pool = UpstreamPool(model, spec, keys, settings, queue_timeout=queue_timeout, metrics=metrics)
        self.client: httpx.AsyncClient = PoolClient(PoolTransport(self.pool),
                                                    httpx.Timeout(request_timeout, connect=settings.connect_timeout))

    def failure(self) -> str:
        return self._error or "no error"

    async def start(self) -> None:
        return None

    async def wait_ready(self) -> None:
        problems = await self.pool.start()
        if len(problems) == len(self.spec.upstreams):
            await self.pool.close()
            self._error = "; ".join(problems)
            one = len(problems) == 1
            raise WorkerStartError(f"{'the upstream' if one else 'no upstream'} of model '{self.model}' "
                                   f"{'did not answer as it should' if one else 'serves it'}: {self._error}; check "
                                   "the URL, the network, its API key and --upstream-model (appliance models "
                                   "add-remote sets them)")
        for problem in problems:
            log.warning("remote.upstream_not_ready", model=self.model, problem=problem)

    async def health(self) -> dict[str, Any]:
        """The pool's state; never fails: upstreams that are out are the pool's to bring back, not a reason to
        restart the worker."""
        return self.pool.state()

    async def stop(self) -> None:
        self.stopping = True
        await self.pool.close()
        await self.client.aclose()
        self.exited.set()
