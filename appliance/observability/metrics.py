"""Prometheus metrics of one app instance, in its own registry (no module-level singletons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from appliance.observability import genai

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CACHE_HIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("appliance_requests", "HTTP requests by route, model and status.",
                                ["route", "model", "status"], registry=r)
        self.request_seconds = Histogram("appliance_request_duration_seconds", "Time to the last byte of a response.",
                                         ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("appliance_time_to_first_token_seconds", "Time from request to first generated text.",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("appliance_inter_token_latency_seconds", "Gap between streamed chunks.",
                                     ["model"], buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.prompt_tokens = Counter("appliance_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter("appliance_completion_tokens", "Tokens generated.", ["model"], registry=r)
        self.queue_wait = Histogram("appliance_queue_wait_seconds", "Time a request waited for a free model slot.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("appliance_queue_depth", "Requests waiting for a model.", ["model"], registry=r)
        self.worker_restarts = Counter("appliance_worker_restarts", "Workers that died and were restarted.",
                                       ["model"], registry=r)
        self.model_load_seconds = Histogram("appliance_model_load_seconds", "Time to start a worker and load a model.",
                                            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.models_loaded = Gauge("appliance_models_loaded", "Models whose worker is running.", registry=r)
        # by worker, `name@N` (the labels above hold the model's name): what the dashboard shows per version
        self.worker_requests = Counter("appliance_worker_requests", "Requests a model worker held, by worker "
                                       "(name@N) and outcome (error: a server error or the worker's failure).",
                                       ["worker", "outcome"], registry=r)
        # the upstreams of remote models, by model and upstream base URL
        self.upstream_up = Gauge("appliance_upstream_up", "1 while an upstream of a loaded remote model is in the "
                                 "rotation, 0 while it is out (failures or failed health checks).",
                                 ["model", "upstream"], registry=r)
        self.upstream_outstanding = Gauge("appliance_upstream_outstanding", "Requests in flight to an upstream.",
                                          ["model", "upstream"], registry=r)
        self.upstream_requests = Counter("appliance_upstream_requests", "Attempts sent to an upstream, by outcome "
                                         "(error: it failed, refused or cut the request).",
                                         ["model", "upstream", "outcome"], registry=r)
        self.upstream_failures = Counter("appliance_upstream_failures", "Failures of an upstream (connection, "
                                         "timeout, 502/503/504, a cut stream, a failed health check).",
                                         ["model", "upstream"], registry=r)
        # the response cache: "exact" (diskcache) and "semantic" (prompt embeddings)
        self.cache_hits = Counter("appliance_cache_hits", "Requests answered from the response cache.", ["cache"],
                                  registry=r)
        self.cache_misses = Counter("appliance_cache_misses", "Cacheable requests the response cache did not hold.",
                                    ["cache"], registry=r)
        self.cache_skipped = Counter("appliance_cache_skipped", "Requests not looked up or answers not stored, by "
                                     "reason (no-store, nondeterministic, n, logprobs, privacy, incomplete).",
                                     ["reason"], registry=r)
        self.cache_evictions = Counter("appliance_cache_evictions", "Entries pushed out by the size limit or TTL.",
                                       ["cache"], registry=r)
        self.cache_bytes = Gauge("appliance_cache_bytes", "Size of the response cache.", ["cache"], registry=r)
        self.cache_entries = Gauge("appliance_cache_entries", "Entries in the response cache.", ["cache"], registry=r)
        self.cache_hit_seconds = Histogram("appliance_cache_hit_seconds", "Time to find a cached answer.", ["cache"],
                                           buckets=CACHE_HIT_BUCKETS, registry=r)
        self.embedding_cache = Counter("appliance_embedding_cache_lookups", "Embedding cache lookups by result.",
                                       ["result"], registry=r)
        self.embedding_cache_hit_ratio = Gauge("appliance_embedding_cache_hit_ratio",
                                               "Share of embedding lookups served from the cache since start.",
                                               registry=r)
        self.embedded_texts = Counter("appliance_embedded_texts", "Texts embedded by the model (cache misses).",
                                      registry=r)
        self.rag_query_seconds = Histogram("appliance_rag_query_seconds", "Retrieval time of a RAG query, by mode.",
                                           ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.rag_chunks = Counter("appliance_rag_chunks_ingested", "Chunks added to RAG collections.", registry=r)

        # GenAI semantic conventions v1.41.1 server metrics, per model version (gen_ai_response_model = NAME@N)
        self.genai = genai.ServerMetrics(
            ttft=Histogram("gen_ai_server_time_to_first_token_seconds", "Time to generate the first token for "
                           "successful responses (gen_ai.server.time_to_first_token), queue included.",
                           genai.LABELS, buckets=genai.TTFT_BUCKETS, registry=r),
            per_output_token=Histogram("gen_ai_server_time_per_output_token_seconds", "Time per output token after "
                                       "the first for successful responses (gen_ai.server.time_per_output_token).",
                                       genai.LABELS, buckets=genai.TPOT_BUCKETS, registry=r),
            duration=Histogram("gen_ai_server_request_duration_seconds", "Request duration to the last byte "
                               "(gen_ai.server.request.duration); error_type is empty for a success.",
                               (*genai.LABELS, "error_type"), buckets=genai.DURATION_BUCKETS, registry=r))

    def render(self) -> bytes:
        return generate_latest(self.registry)
