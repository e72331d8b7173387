"""A local HTTP stand-in on 127.0.0.1 for download tests: files, redirects, a few Hugging Face Hub endpoints.

Real sockets and a real HTTP server (the standard library's); it records every request it answered."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    announce_length: bool = True


class StandIn:
    """Routes by exact path (the query string ignored); unknown paths answer 404."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, with_body: bool) -> None:
                path = self.path.split("?", 1)[0]
                standin.seen.append(Seen(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
                route = standin.routes.get(path, Route(404, b"not found"))
                self.send_response(route.status)
                for key, value in route.headers.items():
                    self.send_header(key, value)
                if route.announce_length:
                    self.send_header("Content-Length", str(len(route.body)))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if with_body:
                    self.wfile.write(route.body)

            def do_GET(self) -> None:
                self._answer(True)

            def do_HEAD(self) -> None:
                self._answer(False)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that stops reading (a size limit) resets the connection: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def file(self, path: str, body: bytes, **headers: str) -> str:
        self.routes[path] = Route(200, body, headers)
        return self.url + path

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self.routes[path] = Route(status, b"", {"Location": location})
        return self.url + path

    def hub_file(self, repo: str, name: str, body: bytes, *, lfs: bool = True, revision: str = "main") -> None:
        """A file of a Hub repository as the Hub serves it: resolve URL, commit header, LFS etag = sha256."""
        etag = hashlib.sha256(body).hexdigest() if lfs else hashlib.sha1(body).hexdigest()
        headers = {"X-Repo-Commit": "0" * 40, "ETag": f'"{etag}"'}
        if lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(body))
        self.routes[f"/{repo}/resolve/{revision}/{name}"] = Route(200, body, headers)
        tree = self.routes.setdefault(f"/api/models/{repo}/tree/{revision}",
                                      Route(200, b"[]", {"Content-Type": "application/json"}))
        entries = json.loads(tree.body)
        entries.append({"type": "file", "path": name, "size": len(body), "oid": etag})
        tree.body = json.dumps(entries).encode()

    def requests_to(self, path: str) -> Iterator[Seen]:
        return (s for s in self.seen if s.path == path)
