"""The remote pools' transport (httpx over aiohttp) against raw asyncio servers: what reaches the upstream, bodies
streamed as they arrive, and each failure as the httpx error the pool's failover and the gateway expect."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import httpx
import pytest

from appliance.engines.aiohttp_transport import AiohttpTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head, await reader.readexactly(length)


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_the_request_arrives_whole_and_the_answer_comes_back_as_httpx() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Up: 1\r\nContent-Length: 11\r\n\r\n"
                     b'{"ok":true}')
        await writer.drain()
        writer.close()

    async def test() -> None:
        server, url = await serve(handler)
        async with server, httpx.AsyncClient(transport=AiohttpTransport()) as client:
            response = await client.post(url + "/v1/chat/completions?x=1", content=b'{"model":"m"}',
                                         headers={"authorization": "Bearer k", "content-type": "application/json"})
        assert response.status_code == 201 and response.json() == {"ok": True}
        assert response.headers["x-up"] == "1" and response.reason_phrase == "Created"
        head, body = seen[0]
        assert head.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
        assert b"\r\nauthorization: bearer k\r\n" in head.lower() and body == b'{"model":"m"}'

    run(test)


def test_a_stream_is_relayed_as_it_arrives() -> None:
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        await go_on.wait()  # the second event only once the client has the first
        writer.write(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def test() -> None:
        server, url = await serve(handler)
        async with server, httpx.AsyncClient(transport=AiohttpTransport()) as client:
            async with client.stream("POST", url + "/v1/chat/completions", content=b"{}") as response:
                chunks = []
                async for chunk in response.aiter_raw():
                    chunks.append(chunk)
                    go_on.set()
        assert b"".join(chunks) == b"data: first\n\ndata: second\n\n" and chunks[0] == b"data: first\n\n"

    run(test)


def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused

        async def test() -> None:
            async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
                with pytest.raises(httpx.ConnectError):
                    await client.get(f"http://127.0.0.1:{port}/v1/models")

        run(test)


def test_a_connection_lost_mid_body_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        writer.close()  # before the last chunk

    async def test() -> None:
        server, url = await serve(handler)
        async with server, httpx.AsyncClient(transport=AiohttpTransport()) as client:
            async with client.stream("POST", url + "/v1/chat/completions", content=b"{}") as response:
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _ in response.aiter_raw():
                        pass

    run(test)


def test_an_upstream_that_does_not_answer_times_out_as_a_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            await reader.read()  # never answers; returns when the client gives up
        finally:
            writer.close()

    async def test() -> None:
        server, url = await serve(handler)
        async with server, httpx.AsyncClient(transport=AiohttpTransport(), timeout=httpx.Timeout(0.2)) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url + "/v1/chat/completions", content=b"{}")

    run(test)
