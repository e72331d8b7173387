"""GenAI semantic conventions v1.41.1 (pinned: the conventions have since moved to their own repository and are being
renamed): the attributes of a worker call's CLIENT span, and the server metrics' bucket boundaries and observation.

Only names, numbers and flags: never a prompt, an output, a tool's arguments or a stop sequence (client text)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram

# gen-ai-metrics.md v1.41.1, "SHOULD be specified with ExplicitBucketBoundaries of"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# the Prometheus label names of the conventions' attributes (dots become underscores)
LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model")

# request body field -> span attribute (gen-ai-spans.md, Inference); `stop` is left out: it is the client's text
_SAMPLING = {"temperature": "gen_ai.request.temperature", "top_p": "gen_ai.request.top_p",
             "top_k": "gen_ai.request.top_k", "max_tokens": "gen_ai.request.max_tokens",
             "frequency_penalty": "gen_ai.request.frequency_penalty",
             "presence_penalty": "gen_ai.request.presence_penalty", "seed": "gen_ai.request.seed"}
_INTEGER = frozenset({"gen_ai.request.max_tokens", "gen_ai.request.seed"})


def operation_name(path: str) -> str:
    """`gen_ai.operation.name` of a worker route."""
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/embeddings"):
        return "embeddings"
    return "text_completion"


@dataclass(frozen=True)
class WorkerCall:
    """Who served one request: what the metrics and the CLIENT span are labelled with."""

    operation: str  # chat | text_completion | embeddings
    provider: str  # the engine: llama.cpp | vllm | remote
    request_model: str  # what the client asked for (a name or an alias)
    response_model: str  # the version that served it, NAME@N

    @property
    def span_name(self) -> str:
        return f"{self.operation} {self.request_model}"

    def labels(self) -> tuple[str, str, str, str]:
        return self.operation, self.provider, self.request_model, self.response_model

    def request_attributes(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The CLIENT span's attributes known before the call: operation, provider, models, sampling parameters."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": self.operation, "gen_ai.provider.name": self.provider,
            "gen_ai.request.model": self.request_model, "gen_ai.response.model": self.response_model,
            "gen_ai.request.stream": bool(body.get("stream")),
        }
        for field, name in _SAMPLING.items():
            value = body.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[name] = int(value) if name in _INTEGER else float(value)
        if (n := body.get("n")) not in (None, 1):
            attributes["gen_ai.request.choice.count"] = int(n)
        form = (body.get("response_format") or {}).get("type")
        if form in ("json_object", "json_schema"):
            attributes["gen_ai.output.type"] = "json"
        return attributes


def response_attributes(usage: Mapping[str, Any] | None, finish_reasons: list[str],
                        time_to_first_chunk: float | None) -> dict[str, Any]:
    """The CLIENT span's attributes known after the call: token usage, finish reasons, time to the first chunk."""
    attributes: dict[str, Any] = {}
    if usage:
        attributes["gen_ai.usage.input_tokens"] = int(usage.get("prompt_tokens", 0))
        if "completion_tokens" in usage:
            attributes["gen_ai.usage.output_tokens"] = int(usage["completion_tokens"])
    if finish_reasons:
        attributes["gen_ai.response.finish_reasons"] = finish_reasons
    if time_to_first_chunk is not None:
        attributes["gen_ai.response.time_to_first_chunk"] = time_to_first_chunk
    return attributes


@dataclass(frozen=True)
class ServerMetrics:
    """gen_ai.server.* histograms (Prometheus naming), labelled per model version."""

    ttft: Histogram
    per_output_token: Histogram
    duration: Histogram

    def observe(self, call: WorkerCall, started: float, ended: float, first_token: float | None,
                output_tokens: int, error: str = "") -> None:
        """One request that began (queue included) at `started` and sent its last byte at `ended`; `first_token`:
        when its first generated text went out (streams only). TTFT and time per output token count successful
        responses only; time per output token is the time after the first token over the tokens after it."""
        labels = call.labels()
        self.duration.labels(*labels, error).observe(max(0.0, ended - started))
        if error or first_token is None:
            return
        self.ttft.labels(*labels).observe(max(0.0, first_token - started))
        if output_tokens > 1:
            self.per_output_token.labels(*labels).observe(max(0.0, ended - first_token) / (output_tokens - 1))
