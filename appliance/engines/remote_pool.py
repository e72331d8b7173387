"""A remote model's upstreams (DESIGN section 6): weighted least-outstanding routing with a concurrency limit per
upstream, passive health (`[remote] max_fails` failures within `fail_timeout` take an upstream out), active health
checks (GET <url>/models) that bring it back, and failover of a request that has not started streaming.

Routing is nginx's `least_conn`: the upstream with the fewest requests in flight per unit of weight, ties broken by
smooth weighted round robin. A stream that has started cannot move: if its upstream fails, or ends it without
`data: [DONE]`, the stream raises `httpx.RemoteProtocolError`, which the gateway turns into an SSE error event."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from appliance.config import RemoteSettings
from appliance.engines.aiohttp_transport import AiohttpTransport
from appliance.errors import ModelUnavailable
from appliance.logs import get_logger
from appliance.observability.metrics import Metrics
from appliance.registry.remote import RemoteSpec, UpstreamSpec

log = get_logger(__name__)
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
FAILOVER_STATUS = frozenset({502, 503, 504})  # the upstream cannot serve: count a failure and try the next one
BUSY_STATUS = 429  # the upstream is full: try the next one, without holding it against the upstream
_DROPPED_HEADERS = frozenset({"host", "content-length", "authorization"})


class NoUpstream(ModelUnavailable):
    code = "upstream_unavailable"


@dataclass(eq=False)
class Upstream:
    spec: UpstreamSpec
    key: str | None
    limit: int
    base: httpx.URL = field(init=False)
    up: bool = True
    outstanding: int = 0
    requests: int = 0
    failures: int = 0
    recent: deque[float] = field(default_factory=deque)  # monotonic times of failures within fail_timeout
    last_error: str = ""
    since: float = field(default_factory=time.time)  # when `up` last changed (wall clock, for people)
    current: int = 0  # smooth weighted round robin between upstreams equally loaded
    _urls: dict[str, httpx.URL] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base = httpx.URL(self.spec.url)

    def url_for(self, path: str) -> httpx.URL:
        """The upstream URL of a gateway path below /v1 (parsed once per path: this runs for every request)."""
        url = self._urls.get(path)
        if url is None:
            url = self.base.copy_with(path=self.base.path + path)
            if len(self._urls) < 64:
                self._urls[path] = url
        return url

    @property
    def url(self) -> str:
        return self.spec.url

    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"} if self.key else {}

    def state(self) -> dict[str, Any]:
        return {"url": self.url, "weight": self.spec.weight, "concurrency": self.limit,
                "state": "up" if self.up else "down", "outstanding": self.outstanding, "requests": self.requests,
                "failures": self.failures, "last_error": self.last_error or None,
                "since": datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds")}


class UpstreamPool:
    """The upstreams of one remote model, their state, and the choice of one per request."""

    def __init__(self, model: str, spec: RemoteSpec, keys: list[str], settings: RemoteSettings, *,
                 queue_timeout: float = 120.0, metrics: Metrics | None = None) -> None:
        self.model = model
        self.upstream_model = spec.model
        self.settings = settings
        self.queue_timeout = queue_timeout
        self.metrics = metrics
        self.upstreams = [Upstream(u, _key_for(keys, i), u.concurrency or settings.concurrency)
                          for i, u in enumerate(spec.upstreams)]
        self._freed = asyncio.Event()
        self._waiting = 0
        self._watcher: asyncio.Task[None] | None = None
        self._probes = httpx.AsyncClient(timeout=httpx.Timeout(settings.health_timeout), trust_env=False)
        self._series: dict[Upstream, tuple[Any, ...]] = {}  # each upstream's metric children, looked up once
        if metrics is not None:
            for u in self.upstreams:
                labels = (model, u.url)
                self._series[u] = (metrics.upstream_up.labels(*labels), metrics.upstream_outstanding.labels(*labels),
                                   metrics.upstream_requests.labels(*labels, "ok"),
                                   metrics.upstream_requests.labels(*labels, "error"),
                                   metrics.upstream_failures.labels(*labels))
        for upstream in self.upstreams:
            self._gauge(upstream)

    @property
    def capacity(self) -> int:
        return sum(u.limit for u in self.upstreams)

    # routing

    def _pick(self, tried: set[Upstream]) -> Upstream | None:
        free = [u for u in self.upstreams if u.up and u not in tried and u.outstanding < u.limit]
        if not free:
            return None
        least = min(u.outstanding / u.spec.weight for u in free)
        tied = [u for u in free if u.outstanding / u.spec.weight == least]
        for u in tied:
            u.current += u.spec.weight
        best = max(tied, key=lambda u: u.current)
        best.current -= sum(u.spec.weight for u in tied)
        return best

    async def take(self, tried: set[Upstream]) -> Upstream:
        """An upstream for one attempt (not one in `tried`), counted as outstanding until `release`. Waits while
        every upstream that could take it is at its concurrency limit; raises NoUpstream when none could."""
        deadline = 0.0
        while True:
            if (upstream := self._pick(tried)) is not None:
                upstream.outstanding += 1
                upstream.requests += 1
                if series := self._series.get(upstream):
                    series[1].set(upstream.outstanding)
                return upstream
            if not any(u.up and u not in tried for u in self.upstreams):
                raise self._unavailable(tried)
            deadline = deadline or time.monotonic() + self.queue_timeout
            freed = self._freed
            self._waiting += 1
            try:
                await asyncio.wait_for(freed.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise NoUpstream(f"every upstream of model '{self.model}' stayed at its concurrency limit for "
                                 f"{self.queue_timeout:.0f}s; retry later", retry_after=1.0) from None
            finally:
                self._waiting -= 1

    def release(self, upstream: Upstream, ok: bool) -> None:
        upstream.outstanding -= 1
        if series := self._series.get(upstream):
            series[1].set(upstream.outstanding)
            series[2 if ok else 3].inc()
        self._wake()

    def _wake(self) -> None:
        if self._waiting:
            self._freed.set()
            self._freed = asyncio.Event()

    def _unavailable(self, tried: set[Upstream]) -> NoUpstream:
        reasons = "; ".join(f"{u.url}: {'failed this request' if u in tried else 'out'}"
                            f"{f' ({u.last_error})' if u.last_error else ''}" for u in self.upstreams)
        return NoUpstream(f"no upstream of model '{self.model}' can serve it now ({reasons}); upstreams that are out "
                          f"are checked every {self.settings.health_interval:g}s and rejoin when they answer",
                          retry_after=self.settings.health_interval)

    # health

    def failed(self, upstream: Upstream, reason: str) -> None:
        """Passive health: a failure; `max_fails` of them within `fail_timeout` take the upstream out."""
        now = time.monotonic()
        upstream.failures += 1
        upstream.last_error = reason[:300]
        if series := self._series.get(upstream):
            series[4].inc()
        upstream.recent.append(now)
        while upstream.recent and upstream.recent[0] < now - self.settings.fail_timeout:
            upstream.recent.popleft()
        if upstream.up and len(upstream.recent) >= self.settings.max_fails:
            self._mark(upstream, up=False)

    def _mark(self, upstream: Upstream, *, up: bool) -> None:
        upstream.up, upstream.since = up, time.time()
        upstream.recent.clear()
        if up:
            log.info("remote.upstream_up", model=self.model, upstream=upstream.url)
        else:
            log.warning("remote.upstream_down", model=self.model, upstream=upstream.url, error=upstream.last_error)
        self._gauge(upstream)
        self._wake()  # requests waiting for room may go to (or give up on) it now

    def _gauge(self, upstream: Upstream) -> None:
        if series := self._series.get(upstream):
            series[0].set(1 if upstream.up else 0)
            series[1].set(upstream.outstanding)

    async def check(self, upstream: Upstream) -> str | None:
        """Active health check: None when the upstream lists the model, else what is wrong."""
        return await probe(self._probes, upstream.url, upstream.key, self.upstream_model)

    async def _probe(self, upstream: Upstream) -> None:
        problem = await self.check(upstream)
        if problem is None:
            if not upstream.up:
                self._mark(upstream, up=True)
        elif upstream.up:
            self.failed(upstream, f"health check: {problem}")
        else:
            upstream.last_error = problem

    async def start(self) -> list[str]:
        """Check every upstream once (those that fail start out of the rotation) and start the health checks;
        returns each failing upstream's problem, every one of them when none serves."""
        problems = await asyncio.gather(*(self.check(u) for u in self.upstreams))
        for upstream, problem in zip(self.upstreams, problems, strict=True):
            if problem is not None:
                upstream.last_error = problem
                self._mark(upstream, up=False)
        self._watcher = asyncio.ensure_future(self._watch())
        return [f"{u.url}: {p}" for u, p in zip(self.upstreams, problems, strict=True) if p is not None]

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            await asyncio.gather(*(self._probe(u) for u in self.upstreams))

    def state(self) -> dict[str, Any]:
        up = sum(u.up for u in self.upstreams)
        return {"status": "ok" if up == len(self.upstreams) else "degraded" if up else "down",
                "upstreams": [u.state() for u in self.upstreams]}

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._probes.aclose()
        if self.metrics is not None:
            for upstream in self.upstreams:
                for gauge in (self.metrics.upstream_up, self.metrics.upstream_outstanding):
                    with contextlib.suppress(KeyError):
                        gauge.remove(self.model, upstream.url)


async def probe(client: httpx.AsyncClient, url: str, key: str | None, model: str) -> str | None:
    """GET <url>/models: None when the upstream answers and lists `model`, else what is wrong (never the key)."""
    try:
        response = await client.get(url + "/models", headers={"authorization": f"Bearer {key}"} if key else {})
        if response.status_code != 200:
            hint = " (the API key was refused)" if response.status_code in (401, 403) else ""
            return f"HTTP {response.status_code}{hint}"
        listed = [m["id"] for m in _decoder.decode(response.content)["data"]]
    except httpx.HTTPError as exc:
        return describe(exc)
    except (msgspec.DecodeError, KeyError, TypeError):
        return "its /models answer is not an OpenAI model list"
    if model not in listed:
        return f"it has no model '{model}' (it serves {', '.join(map(str, listed[:10])) or 'no models'})"
    return None


def check_upstreams(spec: RemoteSpec, keys: list[str], timeout: float) -> list[tuple[str, str | None, float]]:
    """Probe every upstream once, at the same time (blocking; for `appliance doctor`): (url, problem or None,
    seconds taken) each."""

    async def one(client: httpx.AsyncClient, index: int, url: str) -> tuple[str, str | None, float]:
        started = time.perf_counter()
        problem = await probe(client, url, _key_for(keys, index), spec.model)
        return url, problem, time.perf_counter() - started

    async def every() -> list[tuple[str, str | None, float]]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), trust_env=False) as client:
            return list(await asyncio.gather(*(one(client, i, u) for i, u in enumerate(spec.urls))))

    return asyncio.run(every())


def describe(exc: Exception) -> str:
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


def _key_for(keys: list[str], index: int) -> str | None:
    """One key per upstream, in order, or one key for all."""
    if not keys:
        return None
    return keys[0] if len(keys) == 1 else keys[index]


class PoolTransport(httpx.AsyncBaseTransport):
    """Sends the gateway's `/v1/...` requests to one of the pool's upstreams, naming the upstream's model and
    carrying that upstream's key; fails over while nothing has been relayed."""

    def __init__(self, pool: UpstreamPool, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.pool = pool
        self.inner = inner or AiohttpTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.send(request.method, request.url.path, request.url.query, request.headers.multi_items(),
                               request.content, request.extensions)

    async def send(self, method: str, path: str, query: bytes, headers: Iterable[tuple[str, str]], content: bytes,
                   extensions: dict[str, Any]) -> httpx.Response:
        """One request of the gateway (a path under /v1), sent to an upstream; the answer of the first upstream that
        gives one, else the last refusal (429/5xx) of one, else NoUpstream."""
        kept = [(k, v) for k, v in headers if k.lower() not in _DROPPED_HEADERS]
        streaming = False
        if content and any(k.lower() == "content-type" and v.startswith("application/json") for k, v in kept):
            body = _decoder.decode(content)
            if isinstance(body, dict):
                streaming = body.get("stream") is True
                if "model" in body:
                    body["model"] = self.pool.upstream_model
                    content = _encoder.encode(body)
        path = path.removeprefix("/v1")
        tried: set[Upstream] = set()
        refused: httpx.Response | None = None  # the last 429/5xx, answered if no upstream does better
        while True:
            try:
                upstream = await self.pool.take(tried)
            except NoUpstream:
                if refused is not None:  # an upstream's own answer says more than ours would
                    return refused
                raise
            tried.add(upstream)
            url = upstream.url_for(path)
            if query:
                url = url.copy_with(query=query)
            outgoing = httpx.Request(method, url, headers=[*kept, *upstream.auth().items()], content=content,
                                     extensions=extensions)
            response = await self._attempt(upstream, outgoing, streaming)
            if response is None:  # it failed: the next one
                continue
            if response.status_code not in FAILOVER_STATUS and response.status_code != BUSY_STATUS:
                return response
            refused = response

    async def _attempt(self, upstream: Upstream, outgoing: httpx.Request, streaming: bool) -> httpx.Response | None:
        """One upstream's answer, None when it failed to give one; a 429 or 5xx that calls for another upstream comes
        back read and released."""
        held = True
        try:
            response = await self.inner.handle_async_request(outgoing)
            if response.status_code in FAILOVER_STATUS or response.status_code == BUSY_STATUS:
                await response.aread()
                if response.status_code != BUSY_STATUS:
                    self.pool.failed(upstream, f"HTTP {response.status_code}")
                return response
            if not streaming:  # read whole here, so that a connection lost mid-body fails over too
                await response.aread()
                held = False
                self.pool.release(upstream, ok=response.status_code < 500)
                return response
            assert isinstance(response.stream, httpx.AsyncByteStream)
            response.stream = _Relayed(response.stream, self.pool, upstream,
                                       response.headers.get("content-type", "").startswith("text/event-stream"))
            held = False  # the stream releases it when it is closed
            return response
        except httpx.TransportError as exc:
            self.pool.failed(upstream, describe(exc))
            log.warning("remote.failover", model=self.pool.model, upstream=upstream.url, error=describe(exc))
            return None
        finally:
            if held:  # failed, refused, or cancelled (the client went away): the attempt holds nothing
                self.pool.release(upstream, ok=False)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Relayed(httpx.AsyncByteStream):
    """An upstream's response body as it streams: a failure counts against the upstream, an event stream that ends
    without `data: [DONE]` is an error (never a silent cut), and closing it releases the upstream."""

    def __init__(self, inner: httpx.AsyncByteStream, pool: UpstreamPool, upstream: Upstream, events: bool) -> None:
        self.inner, self.pool, self.upstream, self.events = inner, pool, upstream, events
        self.ok = True
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        done, tail = not self.events, b""
        try:
            async for chunk in self.inner:
                if not done:
                    seen = tail + chunk
                    done, tail = b"data: [DONE]" in seen, seen[-16:]
                yield chunk
        except httpx.TransportError as exc:
            self.ok = False
            self.pool.failed(self.upstream, describe(exc))
            raise
        if not done:
            self.ok = False
            self.pool.failed(self.upstream, "the stream ended without [DONE]")
            raise httpx.RemoteProtocolError(f"the upstream {self.upstream.url} ended the stream without [DONE]")

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.release(self.upstream, self.ok)
            await self.inner.aclose()


class PoolClient(httpx.AsyncClient):
    """A remote worker's `client`: the calls the gateway makes (post, get, stream) go straight to the pool's
    transport, without httpx.AsyncClient building a request of its own first; that layer cost about as much CPU
    per request as the upstream call itself (tests/benchmarks/bench_remote.py)."""

    def __init__(self, transport: PoolTransport, timeout: httpx.Timeout) -> None:
        super().__init__(transport=transport, base_url="http://upstream", timeout=timeout, trust_env=False)
        self.pool_transport = transport
        self._extensions = {"timeout": timeout.as_dict()}

    async def _send(self, method: str, url: Any, kwargs: dict[str, Any]) -> httpx.Response:
        content: bytes = kwargs.get("content") or b""
        headers = dict(kwargs.get("headers") or {})
        if kwargs.get("json") is not None:
            content = _encoder.encode(kwargs["json"])
            headers["content-type"] = "application/json"
        timeout = kwargs.get("timeout")
        extensions = self._extensions if timeout is None else {"timeout": httpx.Timeout(timeout).as_dict()}
        path, _, query = str(url).partition("?")
        return await self.pool_transport.send(method, path, query.encode(), list(headers.items()), content,
                                              extensions)

    async def post(self, url: Any, *args: Any, **kwargs: Any) -> httpx.Response:
        response = await self._send("POST", url, kwargs)
        await response.aread()
        return response

    async def get(self, url: Any, *args: Any, **kwargs: Any) -> httpx.Response:
        response = await self._send("GET", url, kwargs)
        await response.aread()
        return response

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: Any, *args: Any, **kwargs: Any
                     ) -> AsyncIterator[httpx.Response]:
        response = await self._send(method, url, kwargs)
        try:
            yield response
        finally:
            await response.aclose()
