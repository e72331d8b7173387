"""An OTLP/HTTP trace receiver for tests and benchmarks: a small HTTP server on loopback that decodes each
ExportTraceServiceRequest (protobuf) with `opentelemetry-proto`, keeps the raw bytes (to scan them for content that
must not be there) and the spans, and answers as a collector does."""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


@dataclass
class ReceivedSpan:
    name: str
    kind: int  # Span.SpanKind: SERVER = 2, CLIENT = 3, INTERNAL = 1
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int
    service: str
    events: list[str] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` -> receiver.endpoint (base URL), .spans, .raw, wait_for(...)."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.spans: list[ReceivedSpan] = []
        self.paths: list[str] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps the exporter's connection open, as a collector does

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                encoding = (self.headers.get("content-encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                receiver.take(self.path, body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def take(self, path: str, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        spans = list(decode(request))
        with self._changed:
            self.paths.append(path)
            self.raw.append(body)
            self.spans += spans
            self._changed.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> list[ReceivedSpan]:
        """Block until `predicate(spans)` is true (each export wakes the waiter), else fail after `timeout`."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.spans), timeout):
                names = sorted({s.name for s in self.spans})
                raise AssertionError(f"the spans expected did not arrive in {timeout}s; received: {names}")
            return list(self.spans)

    def clear(self) -> None:
        with self._changed:
            self.raw.clear()
            self.spans.clear()

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def decode(request: ExportTraceServiceRequest) -> Iterator[ReceivedSpan]:
    for resource_spans in request.resource_spans:
        resource = {kv.key: value_of(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield ReceivedSpan(
                    name=span.name, kind=span.kind, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    attributes={kv.key: value_of(kv.value) for kv in span.attributes},
                    status_code=span.status.code, service=str(resource.get("service.name", "")),
                    events=[e.name for e in span.events], start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano)


SERVER, CLIENT, INTERNAL = Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT, Span.SPAN_KIND_INTERNAL
