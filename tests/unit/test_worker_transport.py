"""The gateway's asyncio transport to a worker's Unix socket, against a real socket server on asyncio and on uvloop:
streamed bodies arrive piece by piece, connections are reused, a connection the worker closed while idle is not,
and a worker that dies mid-body is an httpx transport error as before."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import uvloop

from appliance.supervisor.uds import worker_transport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def streaming_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request on the connection with three SSE events, each written (and flushed) on its own."""
    while True:
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            break
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(3):
            writer.write(chunk(f"data: {i}\n\n".encode()))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    writer.close()


async def dying_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"data: 0\n\n"))
    await writer.drain()
    writer.transport.abort()  # the worker process died


async def one_shot_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers one request, then closes the idle connection (as a worker restarting would)."""
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()


@contextlib.asynccontextmanager
async def served(handler: Handler, path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A worker on `path` answering with `handler`, and the gateway's client to it."""
    server = await asyncio.start_unix_server(handler, str(path))
    async with server, httpx.AsyncClient(transport=worker_transport(path), base_url="http://worker") as client:
        yield client


def run(use_uvloop: bool, main: Callable[[], Awaitable[None]]) -> None:
    if use_uvloop:
        uvloop.run(asyncio.wait_for(main(), 20))
    else:
        asyncio.run(asyncio.wait_for(main(), 20))


@pytest.fixture(params=[False, True], ids=["asyncio", "uvloop"])
def use_uvloop(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_streamed_events_arrive_one_by_one_and_the_connection_is_reused(tmp_path: Path, use_uvloop: bool) -> None:
    path = tmp_path / "w.sock"
    connections = 0

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await streaming_worker(reader, writer)

    async def main() -> None:
        async with served(counting, path) as client:
            for _ in range(3):
                async with client.stream("POST", "/v1/chat/completions", content=b"{}") as response:
                    assert response.status_code == 200
                    pieces = [piece async for piece in response.aiter_raw()]
                assert pieces == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
        assert connections == 1

    run(use_uvloop, main)


def test_a_worker_dying_mid_body_is_a_transport_error(tmp_path: Path, use_uvloop: bool) -> None:
    path = tmp_path / "w.sock"

    async def main() -> None:
        async with served(dying_worker, path) as client:
            with pytest.raises(httpx.TransportError):
                async with client.stream("POST", "/v1/completions", content=b"{}") as response:
                    async for _ in response.aiter_raw():
                        pass

    run(use_uvloop, main)


def test_a_connection_closed_while_idle_is_not_reused(tmp_path: Path, use_uvloop: bool) -> None:
    path = tmp_path / "w.sock"

    async def main() -> None:
        async with served(one_shot_worker, path) as client:
            for _ in range(3):
                assert (await client.get("/health")).content == b"ok"
                await asyncio.sleep(0.15)  # the worker has closed it by now

    run(use_uvloop, main)


def test_no_worker_is_a_connect_error(tmp_path: Path, use_uvloop: bool) -> None:
    async def main() -> None:
        transport = worker_transport(tmp_path / "absent.sock")
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("/health")

    run(use_uvloop, main)


def test_a_silent_worker_is_a_read_timeout(tmp_path: Path, use_uvloop: bool) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the gateway gives up and closes
        writer.close()

    async def main() -> None:
        async with served(silent, tmp_path / "w.sock") as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/health", timeout=0.2)

    run(use_uvloop, main)
