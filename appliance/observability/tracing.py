"""OpenTelemetry tracing of the request path (DESIGN section 2), off until an OTLP endpoint is configured.

Spans: one SERVER span per HTTP request (made by the request middleware, no per-chunk send/receive spans), INTERNAL
child spans for the steps (auth, privacy, quota, cache lookup, RAG retrieval, queue wait), and a CLIENT span per worker
call named `{operation} {model}` with the GenAI attributes of semantic conventions v1.41.1 (`appliance.observability.
genai`). A client's W3C `traceparent` is honoured, and passed on to the worker in the call's headers.

Never content: prompts, outputs, tool arguments and RAG queries are never attributes or events; only model names,
sampling parameters, token counts, finish reasons and timings are.

Off, `Tracing` holds no tracer and every method returns at once (no span objects are made)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.config import TelemetrySettings
from appliance.logs import get_logger

if TYPE_CHECKING:
    from litestar.types import Scope
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = get_logger(__name__)
TRACES_PATH = "v1/traces"
_FALSE = frozenset({"false", "0", "no", "off", ""})
_PROPAGATED = ((b"traceparent", "traceparent"), (b"tracestate", "tracestate"), (b"baggage", "baggage"))


def traces_endpoint(settings: TelemetrySettings, env: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL, or None when tracing is off: `[telemetry] endpoint` (a base URL gets /v1/traces),
    else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (as is), else OTEL_EXPORTER_OTLP_ENDPOINT (+ /v1/traces); off whatever is
    set when OTEL_SDK_DISABLED is true or OTEL_TRACES_EXPORTER is `none`."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() not in _FALSE:
        return None
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    if settings.endpoint:
        return _with_path(settings.endpoint)
    if full := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return full
    if base := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return _with_path(base)
    return None


def _with_path(url: str) -> str:
    url = url.strip()
    return url if url.rstrip("/").endswith("/" + TRACES_PATH) else url.rstrip("/") + "/" + TRACES_PATH


def build_provider(settings: TelemetrySettings, endpoint: str, env: Mapping[str, str]) -> TracerProvider:
    """A tracer provider exporting in batches over OTLP/HTTP (protobuf). The sampler: OTEL_TRACES_SAMPLER when set,
    else parent-based with `sampler_ratio` of new traces (a client's sampled flag is followed). Service name:
    OTEL_SERVICE_NAME when set, else `service_name`; OTEL_RESOURCE_ATTRIBUTES are added."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    attributes: dict[str, Any] = {"service.version": __version__}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = settings.service_name
    sampler = None if env.get("OTEL_TRACES_SAMPLER") else ParentBased(TraceIdRatioBased(settings.sampler_ratio))
    resource = Resource.create(attributes)
    provider = TracerProvider(sampler=sampler, resource=_resource_class()(resource.attributes, resource.schema_url))
    exporter = OTLPSpanExporter(endpoint=endpoint, headers=dict(settings.headers) or None)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _resource_class() -> type:
    from opentelemetry.sdk.resources import Resource

    class HashedOnce(Resource):
        """A Resource that hashes itself once. The SDK's hashes by JSON-encoding its attributes, and the OTLP encoder
        hashes the resource once per exported span: a fifth of the encoding's CPU."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedOnce


class Tracing:
    """The app's tracer, or nothing: built once by the composition root (`Tracing.from_settings`)."""

    def __init__(self, provider: TracerProvider | None = None, endpoint: str | None = None) -> None:
        self.provider = provider
        self.endpoint = endpoint if provider is not None else None
        self.tracer: Tracer | None = None if provider is None else provider.get_tracer("appliance", __version__)

    @classmethod
    def from_settings(cls, settings: TelemetrySettings, env: Mapping[str, str] | None = None) -> Tracing:
        env = os.environ if env is None else env
        endpoint = traces_endpoint(settings, env)
        if endpoint is None:
            return cls()
        log.info("tracing.on", endpoint=endpoint.split("?")[0], sampler_ratio=settings.sampler_ratio)
        return cls(build_provider(settings, endpoint, env), endpoint)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def step(self, name: str, attributes: Mapping[str, Any] | None = None
             ) -> contextlib.AbstractContextManager[Span | None]:
        """An INTERNAL span around one step of the request path; nothing when off. A child of the request's span
        but not made current: nothing is traced inside a step, and attaching a context per step is a fifth of the
        span's cost."""
        if self.tracer is None:
            return contextlib.nullcontext()
        return ended(self.tracer.start_span(name, attributes=attributes))

    def start(self, name: str, parent: Context | None = None, attributes: Mapping[str, Any] | None = None,
              client: bool = False) -> Span | None:
        """A span that the caller ends (`span.end()`), not made current: for steps that begin and end in different
        places (a queue wait, a worker call relayed by a generator). None when off."""
        if self.tracer is None:
            return None
        from opentelemetry.trace import SpanKind

        return self.tracer.start_span(name, context=parent, kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
                                      attributes=attributes)

    def current(self) -> Context | None:
        """The active context (to parent spans started later, elsewhere); None when off."""
        if self.tracer is None:
            return None
        from opentelemetry import context

        return context.get_current()

    @contextlib.contextmanager
    def server_span(self, scope: Scope, headers: Mapping[bytes, bytes]) -> Iterator[Span | None]:
        """The request's SERVER span, current while the app answers (the steps' spans are its children): under the
        client's W3C `traceparent` when it sends one, named by the route's template (`POST /v1/chat/completions`,
        `GET /api/jobs/{job_id}`: ids in paths would make a name each), with the HTTP semantic conventions' request
        attributes; the caller sets the status (`end_server_span`). Nothing when off.

        Made here rather than by Litestar's OpenTelemetry plugin: the ASGI instrumentation under it wraps every
        `send`, once per token of a stream, which cost more gateway CPU per streamed token than all the spans
        together (tests/benchmarks/bench_tracing.py)."""
        if self.tracer is None:
            yield None
            return
        from opentelemetry import context, trace
        from opentelemetry.propagate import extract

        carrier = {name: headers[raw].decode("latin-1") for raw, name in _PROPAGATED if raw in headers}
        method = str(scope.get("method", "HTTP"))
        template = str(scope.get("path_template") or scope["path"]) if scope.get("route_handler") else ""
        attributes: dict[str, Any] = {"http.request.method": method, "url.scheme": scope.get("scheme", "http"),
                                      "url.path": scope["path"],
                                      "network.protocol.version": scope.get("http_version", "1.1")}
        if template:
            attributes["http.route"] = template
        server = scope.get("server")
        if server:
            attributes["server.address"], attributes["server.port"] = server[0], server[1]
        span = self.tracer.start_span(f"{method} {template}" if template else method,
                                      context=extract(carrier) if carrier else None, kind=trace.SpanKind.SERVER,
                                      attributes=attributes)
        token = context.attach(trace.set_span_in_context(span))
        try:
            yield span
        finally:
            context.detach(token)
            span.end()

    @staticmethod
    def end_server_span(span: Span | None, status: int) -> None:
        """The response's status on the SERVER span: a 5xx is an error (a 4xx is the client's, not the server's)."""
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))

    def shutdown(self) -> None:
        """Export what is pending and stop (at the app's shutdown)."""
        if self.provider is not None:
            self.provider.shutdown()


@contextlib.contextmanager
def ended(span: Span | None) -> Iterator[Span | None]:
    """End `span` (when there is one) on leaving the block, recording an exception that escapes it."""
    if span is None:
        yield None
        return
    try:
        yield span
    except Exception as exc:
        record_error(span, exc)
        raise
    finally:
        span.end()


def record_error(span: Span, exc: BaseException) -> None:
    """`error.type` and an ERROR status, with the error's class only: an exception's message may quote content."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
