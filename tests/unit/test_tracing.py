"""Tracing (issue 17): where the exporter sends, steps as spans without content, GenAI attributes of a worker call
(semantic conventions v1.41.1), the GenAI server metrics, and settings from the environment."""

from __future__ import annotations

import contextlib

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from appliance.config import TelemetrySettings, load_settings, public_value
from appliance.observability.genai import WorkerCall, operation_name, response_attributes
from appliance.observability.metrics import Metrics
from appliance.observability.tracing import Tracing, ended, traces_endpoint


@pytest.mark.parametrize(("endpoint", "env", "expected"), [
    ("", {}, None),
    ("http://collector:4318", {}, "http://collector:4318/v1/traces"),
    ("http://collector:4318/", {}, "http://collector:4318/v1/traces"),
    ("https://otlp.example/v1/traces", {}, "https://otlp.example/v1/traces"),
    ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
    ("", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom",
          "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"}, "http://c:4318/custom"),
    ("http://mine:4318", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://mine:4318/v1/traces"),
    ("http://mine:4318", {"OTEL_SDK_DISABLED": "true"}, None),
    ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
    ("http://mine:4318", {"OTEL_SDK_DISABLED": "false"}, "http://mine:4318/v1/traces"),
])
def test_the_endpoint_comes_from_settings_then_the_standard_variables(endpoint: str, env: dict[str, str],
                                                                       expected: str | None) -> None:
    assert traces_endpoint(TelemetrySettings(endpoint=endpoint), env) == expected


def test_off_without_an_endpoint_and_makes_no_spans() -> None:
    tracing = Tracing.from_settings(TelemetrySettings(), {})
    assert not tracing.enabled and tracing.current() is None
    with tracing.server_span(SCOPE, {}) as server:
        assert server is None
    assert tracing.start("queue.wait") is None
    step = tracing.step("quota")
    assert isinstance(step, contextlib.nullcontext)  # no span object, nothing recorded
    with step as span:
        assert span is None


def test_on_with_an_endpoint_builds_an_exporting_provider() -> None:
    tracing = Tracing.from_settings(TelemetrySettings(endpoint="http://127.0.0.1:9", sampler_ratio=0.5),
                                    {"OTEL_SERVICE_NAME": ""})
    try:
        assert tracing.enabled and tracing.endpoint == "http://127.0.0.1:9/v1/traces"
        assert tracing.provider is not None
        assert tracing.provider.resource.attributes["service.name"] == "appliance"
        assert "TraceIdRatioBased{0.5}" in tracing.provider.sampler.get_description()
    finally:
        tracing.shutdown()


SCOPE = {"type": "http", "method": "POST", "scheme": "http", "http_version": "1.1", "path": "/api/jobs/j-123",
         "path_template": "/api/jobs/{job_id}", "route_handler": object(), "server": ("127.0.0.1", 8080)}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_the_server_span_joins_the_clients_trace_is_named_by_route_and_parents_the_steps(
        recorded: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = recorded
    with tracing.server_span(SCOPE, {b"traceparent": TRACEPARENT.encode()}) as server:
        with tracing.step("auth"):
            pass
        tracing.end_server_span(server, 503)
    auth, span = exporter.get_finished_spans()
    assert span.name == "POST /api/jobs/{job_id}" and span.kind == SpanKind.SERVER  # the template, not the id
    assert f"{span.context.trace_id:032x}" == TRACEPARENT.split("-")[1]
    assert span.parent is not None and f"{span.parent.span_id:016x}" == TRACEPARENT.split("-")[2]
    assert auth.parent is not None and auth.parent.span_id == span.context.span_id
    assert span.attributes is not None and dict(span.attributes) == {
        "http.request.method": "POST", "url.scheme": "http", "url.path": "/api/jobs/j-123",
        "network.protocol.version": "1.1", "http.route": "/api/jobs/{job_id}", "server.address": "127.0.0.1",
        "server.port": 8080, "http.response.status_code": 503, "error.type": "503"}
    assert span.status.status_code == StatusCode.ERROR
    with tracing.server_span({**SCOPE, "route_handler": None}, {}) as unrouted:  # a 404 for no route: a root span
        tracing.end_server_span(unrouted, 404)
    last = exporter.get_finished_spans()[-1]
    assert last.name == "POST" and last.parent is None and last.status.status_code == StatusCode.UNSET


@pytest.fixture
def recorded() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider, "http://test/v1/traces"), exporter


def test_steps_nest_under_the_current_span_and_errors_keep_no_message(
        recorded: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = recorded
    assert tracing.tracer is not None
    with tracing.tracer.start_as_current_span("request") as outer, tracing.step("privacy", {"appliance.x": 1}), \
            tracing.step("auth"):
        pass
    with pytest.raises(ValueError, match="secret"), tracing.step("quota"):
        raise ValueError("the prompt said: secret")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert outer is not None and spans["privacy"].parent is not None
    assert spans["privacy"].parent.span_id == outer.get_span_context().span_id
    assert spans["privacy"].attributes == {"appliance.x": 1}
    assert spans["auth"].parent is not None and spans["auth"].parent.span_id == outer.get_span_context().span_id
    quota = spans["quota"]
    assert quota.status.status_code == StatusCode.ERROR and quota.attributes == {"error.type": "ValueError"}
    assert "secret" not in str(quota.status.description) and not quota.events  # no message, no exception event


def test_a_span_started_apart_is_ended_once_with_its_error(recorded: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = recorded
    with ended(tracing.start("chat m", client=True)) as span:
        assert span is not None and span.is_recording()
    with pytest.raises(KeyError), ended(tracing.start("queue.wait")):
        raise KeyError("x")
    spans = exporter.get_finished_spans()
    assert [(s.name, s.kind) for s in spans] == [("chat m", SpanKind.CLIENT), ("queue.wait", SpanKind.INTERNAL)]
    assert spans[1].attributes == {"error.type": "KeyError"}
    with ended(None) as nothing:
        assert nothing is None


def test_worker_call_attributes_follow_the_conventions_without_client_text() -> None:
    call = WorkerCall(operation_name("/v1/chat/completions"), "llama.cpp", "smol", "smol@2")
    assert call.span_name == "chat smol"
    body = {"model": "smol", "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "top_p": 0.5,
            "top_k": 40, "max_tokens": 16, "seed": 3, "frequency_penalty": 0.1, "presence_penalty": -0.2,
            "stop": ["the client's words"], "n": 2, "stream": True, "response_format": {"type": "json_schema"}}
    assert call.request_attributes(body) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "llama.cpp", "gen_ai.request.model": "smol",
        "gen_ai.response.model": "smol@2", "gen_ai.request.stream": True, "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": 0.5, "gen_ai.request.top_k": 40.0, "gen_ai.request.max_tokens": 16,
        "gen_ai.request.seed": 3, "gen_ai.request.frequency_penalty": 0.1, "gen_ai.request.presence_penalty": -0.2,
        "gen_ai.request.choice.count": 2, "gen_ai.output.type": "json"}
    assert operation_name("/v1/completions") == "text_completion"
    assert operation_name("/v1/embeddings") == "embeddings"
    assert response_attributes({"prompt_tokens": 5, "completion_tokens": 7}, ["stop"], 0.25) == {
        "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 7,
        "gen_ai.response.finish_reasons": ["stop"], "gen_ai.response.time_to_first_chunk": 0.25}
    assert response_attributes(None, [], None) == {}


def test_genai_server_metrics_per_version() -> None:
    metrics = Metrics()
    call = WorkerCall("chat", "vllm", "alias", "smol@3")
    metrics.genai.observe(call, started=10.0, ended=12.0, first_token=10.5, output_tokens=4)
    metrics.genai.observe(call, started=20.0, ended=20.3, first_token=None, output_tokens=0, error="WorkerFailed")
    labels = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "vllm", "gen_ai_request_model": "alias",
              "gen_ai_response_model": "smol@3"}
    value = metrics.registry.get_sample_value
    assert value("gen_ai_server_time_to_first_token_seconds_sum", labels) == 0.5
    assert value("gen_ai_server_time_to_first_token_seconds_count", labels) == 1  # the failure is not counted
    assert value("gen_ai_server_time_per_output_token_seconds_sum", labels) == 0.5  # 1.5 s over 3 tokens
    assert value("gen_ai_server_request_duration_seconds_count", {**labels, "error_type": ""}) == 1
    assert value("gen_ai_server_request_duration_seconds_count", {**labels, "error_type": "WorkerFailed"}) == 1
    # the conventions' bucket boundaries
    assert value("gen_ai_server_time_to_first_token_seconds_bucket", {**labels, "le": "0.001"}) == 0
    assert value("gen_ai_server_time_per_output_token_seconds_bucket", {**labels, "le": "2.5"}) == 1
    assert value("gen_ai_server_request_duration_seconds_bucket", {**labels, "error_type": "", "le": "81.92"}) == 1


def test_telemetry_settings_from_the_environment_and_headers_never_shown(tmp_path: object) -> None:
    loaded = load_settings({"APPLIANCE_TELEMETRY__ENDPOINT": "http://c:4318",
                            "APPLIANCE_TELEMETRY__HEADERS": '{"authorization": "Bearer s3cret"}',
                            "APPLIANCE_TELEMETRY__SAMPLER_RATIO": "0.25"}, data_dir=str(tmp_path))
    telemetry = loaded.settings.telemetry
    assert telemetry.headers == {"authorization": "Bearer s3cret"} and telemetry.sampler_ratio == 0.25
    shown = {info.key: public_value(info.key, info.value) for info in loaded.describe()}
    assert shown["telemetry.headers"] == {"authorization": "(set)"}
