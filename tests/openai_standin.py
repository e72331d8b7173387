"""A tiny OpenAI-compatible upstream on 127.0.0.1 that answers at once: `GET /v1/models`, `GET /health` and
`POST /v1/chat/completions` (whole or streamed). Real sockets, the standard library's HTTP server.

Tests switch what it does to a chat (`mode`: "ok", "503", "429", "cut" = an event stream whose connection drops
mid-body, "nodone" = an event stream that ends cleanly without `data: [DONE]`) and read whom it served (`chats`,
`keys`). The remote-engine benchmark runs it as its own process: `python -m tests.openai_standin --port P`."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms wait for an ACK
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.standin.connections.add(self.connection)

    def finish(self) -> None:
        self.server.standin.connections.discard(self.connection)
        super().finish()

    def _send(self, status: int, body: bytes, content_type: str = "application/json", length: int | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        standin, sent = self.server.standin, self.headers.get("Authorization", "")
        standin.keys.append(sent.removeprefix("Bearer "))
        if standin.key is not None and sent != f"Bearer {standin.key}":
            self._send(401, b'{"error": {"message": "bad key", "type": "authentication_error"}}')
            return False
        return True

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, b'{"status": "ok"}')
        elif self.path != "/v1/models":
            self._send(404, b'{"error": {"message": "not found"}}')
        elif self._authorised():
            self._send(200, json.dumps({"object": "list", "data": [
                {"id": self.server.standin.model, "object": "model", "created": 0, "owned_by": "standin"}]}).encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        if self.path != "/v1/chat/completions":
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        if not self._authorised():
            return
        standin = self.server.standin
        standin.chats += 1
        mode, model = standin.mode, str(body.get("model", ""))
        if mode in ("503", "429"):
            self._send(int(mode), json.dumps({"error": {"message": f"stand-in says {mode}",
                                                        "type": "server_error"}}).encode())
        elif not body.get("stream"):
            self._send(200, json.dumps({
                "id": "chatcmpl-standin", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                             "finish_reason": "stop"}], "usage": USAGE}).encode())
        else:
            self._stream(model, mode)

    def _stream(self, model: str, mode: str) -> None:
        events = _chunk(model, {"role": "assistant", "content": "Hi"}) + _chunk(model, {"content": " there"}, "stop")
        if mode == "cut":  # announce more than is sent, then drop the connection
            self._send(200, events, "text/event-stream", length=len(events) + 1000)
            self.close_connection = True
            return
        if mode != "nodone":
            events += b"data: [DONE]\n\n"
        self._send(200, events, "text/event-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    standin: OpenAIStandIn

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class OpenAIStandIn:
    def __init__(self, model: str = "standin", key: str | None = None, port: int = 0) -> None:
        self.model, self.key = model, key
        self.mode = "ok"
        self.chats = 0
        self.keys: list[str] = []
        self.connections: set[socket.socket] = set()
        self.server = _Server(("127.0.0.1", port), _Handler)
        self.server.standin = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> OpenAIStandIn:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Die as a killed upstream does: the listening socket closed (new connections refused) and every open
        connection dropped."""
        self.server.shutdown()
        self.server.server_close()
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="standin")
    args = parser.parse_args()
    standin = OpenAIStandIn(args.model, port=args.port)
    print(f"listening on {standin.url}", flush=True)
    standin.server.serve_forever(0.05)


if __name__ == "__main__":
    main()
