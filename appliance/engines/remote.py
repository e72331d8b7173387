"""The `remote` engine: a model served by an OpenAI-compatible upstream (another appliance, a vLLM cluster, KServe,
Ray Serve), proxied by the gateway with its auth, quotas, cache and audit in front (DESIGN section 6).

The upstream's API key is a secret: it lives in a 0600 file under the data dir's `keys/remote/`, goes only into the
Authorization header of requests to that upstream, and is never logged or shown."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import msgspec

from appliance.crypto.secret_files import SecretFiles
from appliance.supervisor.process import WorkerStartError

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class RemoteCredentials(SecretFiles):
    """Upstream API keys, one 0600 file per model in a 0700 folder (keys/remote/<model>.key)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, "upstream API key")


class UpstreamTransport(httpx.AsyncBaseTransport):
    """Sends the gateway's `/v1/...` requests to the upstream's base URL, naming the upstream's model."""

    def __init__(self, base_url: str, upstream_model: str, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.base = httpx.URL(base_url.rstrip("/"))
        self.upstream_model = upstream_model
        self.inner = inner or httpx.AsyncHTTPTransport(retries=1)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/v1")
        url = self.base.copy_with(path=self.base.path + path, query=request.url.query or None)
        content = request.content
        if content and request.headers.get("content-type", "").startswith("application/json"):
            body = _decoder.decode(content)
            if isinstance(body, dict) and "model" in body:
                body["model"] = self.upstream_model
                content = _encoder.encode(body)
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in ("host", "content-length")]
        upstream = httpx.Request(request.method, url, headers=headers, content=content,
                                 extensions=request.extensions)
        return await self.inner.handle_async_request(upstream)

    async def aclose(self) -> None:
        await self.inner.aclose()


class RemoteWorker:
    """The Worker protocol over an upstream: nothing to spawn; ready once the upstream lists its model."""

    pid = None
    engine = "remote"

    def __init__(self, model: str, base_url: str, upstream_model: str, api_key: str | None, *,
                 request_timeout: float, connect_timeout: float = 10.0) -> None:
        self.model = model
        self.base_url = base_url
        self.upstream_model = upstream_model
        self.exited = asyncio.Event()
        self.stopping = False
        self._error = ""
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            transport=UpstreamTransport(base_url, upstream_model), base_url="http://upstream", headers=headers,
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout), trust_env=False,
        )

    def failure(self) -> str:
        return self._error or "no error"

    async def start(self) -> None:
        return None

    async def wait_ready(self) -> None:
        try:
            listed = await self.health()
        except (httpx.HTTPError, msgspec.DecodeError, KeyError, TypeError) as exc:
            self._error = _describe(exc)
            raise WorkerStartError(f"the upstream of model '{self.model}' at {self.base_url} did not answer: "
                                   f"{self._error}; check the URL, the network and its API key "
                                   "(appliance models add-remote sets both)") from None
        if self.upstream_model not in listed["models"]:
            self._error = f"it serves {', '.join(listed['models'][:10]) or 'no models'}"
            raise WorkerStartError(f"the upstream at {self.base_url} has no model '{self.upstream_model}' "
                                   f"({self._error}); register the model again with the right --upstream-model")

    async def health(self) -> dict[str, Any]:
        response = await self.client.get("/v1/models", timeout=10.0)
        response.raise_for_status()
        return {"status": "ok", "models": [m["id"] for m in response.json()["data"]]}

    async def stop(self) -> None:
        self.stopping = True
        await self.client.aclose()
        self.exited.set()


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        hint = " (the API key was refused)" if status in (401, 403) else ""
        return f"HTTP {status}{hint}"
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")
