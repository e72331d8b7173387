"""An httpx transport that sends over aiohttp's client: the remote pools' calls to their upstreams.

The gateway speaks httpx everywhere (a worker's `client` is an `httpx.AsyncClient`), but for a remote upstream the
client's own cost is most of what the gateway adds to a request: httpcore writes the request line and headers and
then the body as two sends through anyio, and parses the answer in Python, about 1.3 ms of CPU per request on this
box (tests/benchmarks/bench_remote.py, under py-spy). aiohttp writes a request in one send and parses responses in
C. The answer comes back as an `httpx.Response` whose body streams from aiohttp as it arrives, and aiohttp's errors
become the httpx errors that the pool's failover and the gateway already handle: a refused or unresolvable
connection `ConnectError`, a connect timeout `ConnectTimeout`, a read timeout `ReadTimeout`, a connection lost
before or during the answer `RemoteProtocolError` or `ReadError`."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx

__all__ = ["AiohttpTransport"]


@contextlib.contextmanager
def _as_httpx(request: httpx.Request) -> Iterator[None]:
    """aiohttp's client errors as the httpx errors of the same meaning."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "timed out connecting", request=request) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "timed out reading the response", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise httpx.UnsupportedProtocol(str(exc), request=request) from exc
    except aiohttp.ClientError as exc:  # a connection reset and the like
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc


class _Body(httpx.AsyncByteStream):
    """A response body as aiohttp receives it; closing it gives the connection back (or drops one left unread)."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self.response = response
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx(self.request):
            async for chunk in self.response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self.response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Requests over one aiohttp session (its connection pool: no limit of its own, the pool's per-upstream limits
    bound it; idle connections kept `keepalive` seconds). Proxies from the environment are ignored, as the gateway's
    other upstream clients ignore them (`trust_env=False`)."""

    def __init__(self, verify: ssl.SSLContext | bool = True, keepalive: float = 5.0) -> None:
        self.ssl = httpx.create_ssl_context(verify=verify) if verify is not False else False
        self.keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the first request, inside the event loop it belongs to
            connector = aiohttp.TCPConnector(limit=0, ssl=self.ssl, keepalive_timeout=self.keepalive)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout") or {}
        with _as_httpx(request):
            response = await self._client().request(
                request.method, str(request.url), headers=request.headers.multi_items(),
                data=request.content or None, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=timeout.get("pool"),
                                              sock_connect=timeout.get("connect"), sock_read=timeout.get("read")))
        return httpx.Response(response.status, headers=response.raw_headers, stream=_Body(response, request),
                              request=request, extensions={"http_version": b"HTTP/1.1",
                                                           "reason_phrase": (response.reason or "").encode()})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
