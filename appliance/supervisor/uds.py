"""The gateway's connection to a worker's Unix socket on asyncio's own transport, for httpx.

httpx reaches a Unix socket through anyio's raw-socket stream, which registers and unregisters the socket with the
event loop and opens a cancel scope for every read: per streamed token, that was a good share of the gateway's CPU.
Here the socket stays registered, arriving bytes are buffered by a protocol, and a read that finds bytes waiting
returns them without suspending."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpcore
import httpx


class _Reader(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.drained: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


async def _wait(future: asyncio.Future[None], timeout: float | None, error: type[Exception]) -> None:
    """Await `future` for at most `timeout` seconds (a bare timer: this runs once per streamed token)."""
    if timeout is None:
        await future
        return
    timer = asyncio.get_running_loop().call_later(timeout, _expire, future, error, timeout)
    try:
        await future
    finally:
        timer.cancel()


def _expire(future: asyncio.Future[None], error: type[Exception], timeout: float) -> None:
    if not future.done():
        future.set_exception(error(f"no progress in {timeout} s"))


class AsyncioUnixStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Reader) -> None:
        self.transport = transport
        self.protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self.protocol
        if not p.buffer and not p.eof:
            p.waiter = asyncio.get_running_loop().create_future()
            try:
                await _wait(p.waiter, timeout, httpcore.ReadTimeout)
            finally:
                p.waiter = None
        if not p.buffer:
            if p.error is not None:
                raise httpcore.ReadError(str(p.error))
            return b""
        data = bytes(p.buffer[:max_bytes])
        del p.buffer[:max_bytes]
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self.transport.is_closing():
            raise httpcore.WriteError("the worker's connection is closed")
        self.transport.write(buffer)
        if self.protocol.paused:
            self.protocol.drained = asyncio.get_running_loop().create_future()
            await _wait(self.protocol.drained, timeout, httpcore.WriteTimeout)

    async def aclose(self) -> None:
        self.transport.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # asked of an idle pooled connection: anything arriving means it is spent
            return bool(self.protocol.buffer) or self.protocol.eof or self.transport.is_closing()
        if info == "socket":
            return self.transport.get_extra_info("socket")
        return None


class AsyncioUnixBackend(httpcore.AsyncNetworkBackend):
    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_unix_connection(_Reader, path)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return AsyncioUnixStream(transport, protocol)  # uvloop's transports quack like asyncio's

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None
                          ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("this backend connects to Unix sockets only")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def worker_transport(socket_path: Path) -> httpx.AsyncHTTPTransport:
    """httpx's transport (its request mapping and exceptions) over this backend. httpx (pinned <0.29) takes no
    network backend, so its connection pool is replaced by an equal one that has ours."""
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    transport._pool = httpcore.AsyncConnectionPool(
        max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0, uds=str(socket_path),
        network_backend=AsyncioUnixBackend())
    return transport
