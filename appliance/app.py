"""The composition root: `create_app(settings)` builds services, routes, middleware, error handlers and the
lifespan that owns the worker pool."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import structlog
from litestar import Litestar, Request, Response, Router, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from litestar.middleware.authentication import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.openapi import OpenAPIConfig
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance import __version__, memory
from appliance.admin.alerts_routes import ROUTES as ALERTS_ROUTES
from appliance.admin.audit_routes import ROUTES as AUDIT_ROUTES
from appliance.admin.auth_routes import ROUTES as AUTH_ROUTES
from appliance.admin.auth_routes import cookie_name
from appliance.admin.cache_routes import ROUTES as CACHE_ROUTES
from appliance.admin.dashboard_routes import ROUTES as DASHBOARD_ROUTES
from appliance.admin.keys_routes import ROUTES as KEYS_ROUTES
from appliance.admin.model_jobs_routes import ROUTES as MODEL_JOBS_ROUTES
from appliance.admin.models_routes import ROUTES as MODELS_ROUTES
from appliance.admin.oidc_routes import ROUTES as OIDC_ROUTES
from appliance.admin.policies_routes import ROUTES as POLICIES_ROUTES
from appliance.admin.privacy_routes import ROUTES as PRIVACY_ROUTES
from appliance.admin.rag_routes import ROUTES as RAG_ROUTES
from appliance.admin.settings_routes import ROUTES as SETTINGS_ROUTES
from appliance.admin.usage_routes import ROUTES as USAGE_ROUTES
from appliance.admin.users_routes import ROUTES as USERS_ROUTES
from appliance.admin.webui_routes import ROUTES as WEBUI_ROUTES
from appliance.admin.webui_routes import SECURITY_HEADERS, UI_PATHS, WebUiAssets, webui_dir
from appliance.audit import AuditLog
from appliance.auth.guards import PUBLIC, permission, permission_guard
from appliance.auth.keys import ApiKeyService, derive_pepper
from appliance.auth.oidc import OIDC_SECRET, OidcSignIn, check_settings, sealing_key
from appliance.auth.passwords import derive_password_pepper
from appliance.auth.quotas import QuotaService
from appliance.auth.rbac import Rbac
from appliance.auth.roles_file import RolesFile
from appliance.auth.sessions import (
    STATE_CHANGING_METHODS,
    LoginService,
    LoginThrottle,
    SessionService,
    check_csrf,
)
from appliance.auth.users import UserService
from appliance.cache.setup import build_response_cache
from appliance.config import LoadedSettings, Settings
from appliance.crypto.secret_files import SecretFiles
from appliance.datadir import DataDir
from appliance.doctor import diagnose
from appliance.engines.llamacpp import LlamaCppEngine, gpu_offload_supported
from appliance.engines.remote import RemoteCredentials, RemoteWorker
from appliance.engines.select import Gpu, choose_engine, probe_gpus
from appliance.engines.vllm import VllmEngine, VllmWorker, watermark_plugin
from appliance.errors import ApplianceError, InvalidRequest, ModelUnavailable
from appliance.feedback.ledger import ResponseLedger
from appliance.feedback.routes import FEEDBACK_ROUTES
from appliance.feedback.service import FeedbackService
from appliance.feedback.store import FeedbackStore, ServedResponseStore
from appliance.gateway.embeddings import EmbeddingsEndpoint
from appliance.gateway.openapi import document_errors
from appliance.gateway.responses.routes import ResponsesController
from appliance.gateway.responses.service import ResponsesService
from appliance.gateway.responses.store import ConversationStore, ResponseStore
from appliance.gateway.routes import OpenAIController
from appliance.gateway.service import CompletionService, UpstreamError
from appliance.logs import get_logger, install_scrubber
from appliance.observability.alerts.rules import AlertRules
from appliance.observability.alerts.service import AlertService
from appliance.observability.alerts.state import AppState
from appliance.observability.dashboard import Dashboard
from appliance.observability.metrics import Metrics
from appliance.observability.telemetry import Telemetry
from appliance.observability.tracing import Tracing
from appliance.privacy.controls import PrivacyControls
from appliance.rag.chat import RagChat
from appliance.rag.embeddings import EmbeddingService
from appliance.rag.jobs import IngestionJobStore, JobStore
from appliance.rag.retention import RagDocumentStore
from appliance.rag.service import RagService
from appliance.rag.vectors import ChromaServer
from appliance.registry.catalog import load_catalog, tool_call_parser
from appliance.registry.folder import unpacked_from_store
from appliance.registry.pulls import ModelPulls
from appliance.registry.remote import parse_remote_source
from appliance.registry.rollout import RolloutService
from appliance.registry.service import ModelRecord, ModelRegistry
from appliance.registry.sources import ImportPolicy
from appliance.registry.store import LoadableWeights, open_model_store
from appliance.settings_report import SettingsReport
from appliance.storage import StorageFull, storage_full_from
from appliance.supervisor.placement import GgufMemoryEstimator, Placement, system_total_ram
from appliance.supervisor.pool import WorkerPool
from appliance.supervisor.process import Worker, WorkerProcess, sealed_memfd, worker_tokenize
from appliance.usage import UsageLog
from appliance.watermark.keys import WatermarkKeys
from appliance.watermark.routes import WATERMARK_ROUTES
from appliance.watermark.service import WatermarkService

log = get_logger(__name__)
PUBLIC_PATHS = ("/healthz", "/readyz", "/api/auth/login", "/api/auth/methods", "/api/auth/oidc/login",
                "/api/auth/oidc/callback")


class Services:
    """Everything one app instance owns; built once per app, never at import time."""

    def __init__(self, settings: Settings, loaded: LoadedSettings | None = None) -> None:
        self.settings = settings
        self._folders = contextlib.ExitStack()  # model folders unpacked for the app's lifetime
        self.data = DataDir(settings.data_path)
        self.data.require_initialised()
        self.conn = self.data.connect()
        self.metrics = Metrics()
        # tracing (when configured); GPU, box and vLLM metrics in the registry
        self.telemetry = Telemetry(settings, self.metrics, lambda: self.pool.slots.values())
        self.alert_rules = AlertRules.load(settings.alerts.rules_file)  # a wrong rule stops the start, with its line
        self.audit = AuditLog(self.conn)
        self.rbac = Rbac.load(settings.auth.rbac_file)
        self.rbac.record_if_changed(self.audit)  # an edited roles file is a policy change: audit it
        master_key = self.data.read_master_key()
        self.privacy = PrivacyControls.build(self.conn, self.audit, master_key, settings.privacy.policy_file,
                                            connect=self.data.connect)
        self.privacy.record_if_changed()  # an edited privacy.toml is a policy change: audit it
        install_scrubber(lambda text: self.privacy.privacy.apply("logs", text).text)  # no PII in the logs
        self.keys = ApiKeyService(self.conn, derive_pepper(master_key), audit=self.audit, roles=self.rbac.roles)
        self.users = UserService(self.conn, derive_password_pepper(master_key), audit=self.audit,
                                 roles=self.rbac.roles)
        self.roles_file = RolesFile(self.rbac, self.audit, listeners=[self.keys.use_roles, self.users.use_roles])
        self.sessions = SessionService(self.conn, settings.sessions)
        self.oidc = self.single_sign_on(settings, master_key)  # None unless [oidc] issuer is set
        self.store = open_model_store(self.data, settings.crypto)
        self.store.migrate_plaintext()  # blobs stored in plaintext by an earlier version are encrypted now
        self.registry = ModelRegistry(self.conn, self.store, load_catalog(settings.models.catalog), audit=self.audit)
        self.pulls = ModelPulls(self.data.connect, self.store, self.registry.catalog,  # pulls from the admin API
                                ImportPolicy.from_settings(settings.models), self.audit)
        self.llamacpp = LlamaCppEngine(settings.llamacpp)
        self.vllm = VllmEngine(settings.vllm)
        self.remote_keys = RemoteCredentials(self.data.keys / "remote")
        self.pool = WorkerPool(settings.models, settings.gateway, settings.supervisor, self.new_worker, self.metrics,
                               parallel=settings.llamacpp.parallel, on_event=self.audit_model_event)
        self.pool.parallel_of = self.admission
        # memory fit: estimated from the GGUF header, read through the store (only its first segments decrypted)
        self.pool.placement = Placement(settings.models, GgufMemoryEstimator(
            self.registry.get, self.store.gguf_header, settings.llamacpp, gpu=lambda: bool(self.gpus),
            budget=lambda: settings.models.memory_limit_bytes or system_total_ram()))
        self.quotas = QuotaService(self.conn)
        self.embeddings = EmbeddingService(settings.rag, self.data.cache / "embeddings", self.metrics,
                                           imported=self.imported_folder)
        self.embeddings_api = EmbeddingsEndpoint(self.embeddings, self.quotas)
        self.rag = RagService(settings.rag, self.data.rag, self.embeddings, self.rbac, self.metrics, self.audit,
                              server=ChromaServer.from_settings(settings.rag, self.data.keys))
        self.rag.job_store = JobStore(self.conn)  # ingestion jobs outlive a restart
        self.privacy.retention.register(IngestionJobStore(self.conn))  # ... under the `uploads` retention
        self.rag.privacy = self.privacy.privacy  # the `rag` surface at ingestion
        self.privacy.retention.register(RagDocumentStore(self.rag))  # retention, erasure and compaction
        self.response_cache = build_response_cache(settings.cache, self.data.cache, self.metrics,
                                                   embeddings=self.embeddings, privacy=self.privacy)
        self.completions = CompletionService(self.registry, self.pool, self.metrics, self.quotas, self.audit,
                                             cache=self.response_cache if settings.cache.enabled else None)
        self.completions.rag_chat = RagChat(self.rag, self.pool, self.rbac)
        self.completions.privacy = self.privacy.gateway
        self.completions.tracing = self.embeddings_api.tracing = self.telemetry.tracing
        self.usage = self.completions.usage = UsageLog(self.conn)  # the usage history (GET /api/usage)
        # the Responses API over the chat path; stored responses are the `conversations` data class
        self.responses = ResponsesService(self.completions, ResponseStore(self.conn), self.privacy.privacy, self.rbac,
                                          self.audit)
        self.privacy.retention.register(ConversationStore(self.conn))
        # the quality loop: who got each response from which version, and their ratings of it
        self.ledger = self.completions.ledger = self.responses.ledger = ResponseLedger(self.conn)
        self.feedback = FeedbackService(self.conn, self.ledger, lambda: self.privacy.privacy, self.rbac,
                                        settings.rollout.feedback_window_seconds, self.metrics.registry)
        self.privacy.retention.register(FeedbackStore(self.conn))
        self.privacy.retention.register(ServedResponseStore(self.conn))
        # versions: a worker per version (`name@N`), aliases and canaries resolved per request, canaries watched
        self.rollout = RolloutService(self.registry, self.pool, settings.rollout, self.audit, self.metrics.registry)
        self.feedback.on_rating = self.rollout.rated  # ratings move bandits and judge canaries
        self.pool.key = self.registry.versions.worker_key
        self.pool.on_request = self.rollout.observe
        self.completions.rollout = self.rollout
        self.dashboard = Dashboard(self.metrics, self.pool, self.registry, self.data.root,
                                   memory_budget=settings.models.memory_limit_bytes,
                                   semantic_cache=settings.cache.enabled and settings.cache.semantic)
        # alerts over the app's own signals; its gauges (stalled workers, the audit chain ...) are in /metrics too
        self.alert_state = AppState(self.metrics, self.pool, self.quotas,
                                    memory_budget=settings.models.memory_limit_bytes)
        self.metrics.registry.register(self.alert_state)
        self.alerts = AlertService(settings.alerts, self.alert_rules, self.metrics, self.alert_state, self.audit,
                                   self.data.root, generator_url=external_url(settings) + "/ui/#/dashboard")
        self.dashboard.alerts = self.alerts.for_dashboard
        # the settings as loaded (with their sources), and the doctor's findings (GET /api/settings)
        self.settings_view = SettingsReport(loaded or LoadedSettings(settings, {}, None),
                                            functools.partial(diagnose, settings, self.vllm))
        self.webui = WebUiAssets(webui_dir())
        # the llama.cpp workers' watermark (a key per model, from a secret wrapped under the key ring) and detection
        self.watermark = WatermarkService(settings.watermark, WatermarkKeys(self.store.ring, self.store.wrapped))

    def single_sign_on(self, settings: Settings, master_key: bytes) -> OidcSignIn | None:
        """`self.logins` (password sign-in, refused when `[oidc] local_passwords = false`) and the OpenID Provider
        sign-in when one is configured; its client secret is kept in keys/oidc/ (`appliance oidc set-secret`)."""
        check_settings(settings.oidc, self.rbac.roles)
        name = settings.oidc.provider_name or urlsplit(settings.oidc.issuer).hostname or "the identity provider"
        refused = None if settings.oidc.local_passwords else (
            f"password sign-in is turned off on this appliance; use 'Sign in with {name}' instead (API keys still "
            "work for scripts)")
        self.logins = LoginService(self.users, self.sessions, LoginThrottle(settings.sessions), audit=self.audit,
                                   passwords_refused=refused)
        if not settings.oidc.issuer:
            return None
        secret = SecretFiles(self.data.keys / "oidc", "OpenID client secret").load(OIDC_SECRET)
        return OidcSignIn(settings.oidc, secret, sealing_key(master_key), self.users, self.logins)

    def imported_folder(self, name: str) -> Path | None:
        """A Hugging Face folder model from the store, unpacked into private tmpfs for as long as the app runs
        (an embedding model imported with `appliance models pull`)."""
        record = self.registry.find(name)
        if record is None or record.format != "hf":
            return None
        return self._folders.enter_context(unpacked_from_store(self.store, record.sha256))

    def audit_model_event(self, action: str, model: str, outcome: str, details: dict[str, object]) -> None:
        name, _, version = model.partition("@")  # a worker serves one version, `name@N`: the model is the target
        extra = {"version": int(version)} if version.isdigit() else {}
        self.audit.record("supervisor", action, name, outcome, **details, **extra)  # type: ignore[arg-type]

    def admission(self, name: str) -> int:
        """Requests a model's worker takes at once, by its engine: llama.cpp's `parallel`, vLLM's `parallel`, the
        sum of a remote model's upstream limits (each upstream is held to its own by the pool's routing)."""
        record = self.registry.find(name)
        if record is not None and record.format == "remote":
            return sum(u.concurrency or self.settings.remote.concurrency
                       for u in parse_remote_source(record.source).upstreams)
        if record is not None and record.format == "hf":
            return self.settings.vllm.parallel
        return self.settings.llamacpp.parallel

    def detect_model(self, model: str, principal: Any) -> ModelRecord:
        """The record of the version that would answer `model` for `principal` (404 as for a completion)."""
        self.completions.check_model(model, principal)
        return self.registry.get(self.rollout.route(model, principal).ref)

    async def detect_tokens(self, model: str, text: str) -> list[int]:
        """`text` in the tokens of the version that would answer `model` (its worker is loaded if need be)."""
        worker = await self.pool.ensure_loaded(self.rollout.route(model).ref)
        data = await worker_tokenize(worker.client, model, text, "to test for a watermark")
        return [int(t) for t in data["tokens"]]

    @functools.cached_property
    def gpus(self) -> list[Gpu]:
        return probe_gpus()

    async def new_worker(self, name: str, resources: contextlib.AsyncExitStack) -> Worker:
        record = self.registry.get(name)
        vllm = await asyncio.to_thread(lambda: self.vllm.build) if record.format == "hf" else None
        choice = choose_engine(record.format, self.gpus, vllm=vllm, llamacpp_gpu=gpu_offload_supported())
        if choice.engine == "none":
            raise ModelUnavailable(f"model '{name}' cannot run on this box: {choice.reason}", code="no_engine")
        s = self.settings
        if choice.engine == "remote":
            return RemoteWorker(name, parse_remote_source(record.source), self.remote_keys.load_all(record.name),
                                s.remote, request_timeout=s.gateway.request_timeout,
                                queue_timeout=s.gateway.queue_timeout, metrics=self.metrics)
        socket_path = self.data.run / f"{record.sha256[:16]}.sock"
        timeouts = {"load_timeout": s.supervisor.load_timeout, "stop_timeout": s.supervisor.stop_timeout,
                    "request_timeout": s.gateway.request_timeout}
        if choice.engine == "vllm":  # the folder unpacked into private tmpfs, removed when the stack closes
            folder = await asyncio.to_thread(resources.enter_context, unpacked_from_store(self.store, record.sha256))
            parser = tool_call_parser(self.registry.catalog, record.name, record.source)
            watermark = self.watermark.worker_config(record)  # a logits processor, from a private tmpfs folder
            plugin = None if watermark is None else resources.enter_context(
                watermark_plugin(self.store.tmpfs, watermark))
            launch = self.vllm.launch(folder, record.name, socket_path, parser, **self.telemetry.vllm_tracing(),
                                      watermark=plugin)
            return VllmWorker(name, launch, socket_path, **timeouts)
        # decrypted into a sealed memfd only, wiped when the stack closes
        weights = self.store.open_for_load(record.sha256, "memfd")
        loaded: LoadableWeights = await asyncio.to_thread(resources.enter_context, weights)
        need = self.pool.slots[name].need if name in self.pool.slots else None  # automatic slots, as placement sized
        launch = dataclasses.replace(self.llamacpp.launch(loaded.path, name, sized=need), pass_fds=loaded.fds)
        watermark = self.watermark.worker_config(record)
        if watermark is not None:  # the key reaches the worker in a sealed memfd it inherits, never argv or env
            fd = resources.enter_context(sealed_memfd("appliance-watermark", watermark))
            launch = dataclasses.replace(launch, argv=[*launch.argv, "--watermark-fd", str(fd)],
                                         pass_fds=(*launch.pass_fds, fd))
        return WorkerProcess(name, launch, socket_path, **timeouts)


def error_response(exc: ApplianceError) -> Response[Any]:
    if isinstance(exc, StorageFull):  # the operator must act: say so in the log too
        log.error("storage.full", store=exc.store, path=exc.path)
    if isinstance(exc, UpstreamError):
        return Response(exc.body, status_code=exc.status_code, media_type="application/json")
    return Response(exc.to_body(), status_code=exc.status_code, headers=exc.headers() or None)


def http_error_response(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
    if exc.status_code >= 500:
        kind = "server_error"
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
    body = {"error": {"message": exc.detail, "type": kind, "param": None, "code": code}}
    return Response(body, status_code=exc.status_code, headers=exc.headers)


def unexpected_error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    services: Services = request.app.state.services
    if (full := storage_full_from(exc, services.data.stores())) is not None:  # met where no store named itself
        return error_response(full)
    log.exception("request.unhandled", error_type=type(exc).__name__)
    request_id = request.scope["state"].get("request_id", "")
    body = {"error": {"message": f"internal error (request id {request_id}); see the server log",
                      "type": "server_error", "param": None, "code": "internal_error"}}
    return Response(body, status_code=500)


def external_url(settings: Settings) -> str:
    if settings.alerts.external_url:
        return settings.alerts.external_url.rstrip("/")
    host = settings.server.host if settings.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.server.port}"


def allowed_hosts(settings: Settings) -> frozenset[str]:
    hosts = {h.lower().strip("[]") for h in settings.server.allowed_hosts}
    if settings.server.host not in ("0.0.0.0", "::"):
        hosts.add(settings.server.host.lower().strip("[]"))
    return frozenset(hosts)


def host_of(header: bytes) -> str:
    """The host part of a Host header, without port or IPv6 brackets."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class RequestContextMiddleware(ASGIMiddleware):
    """Host check, request id, access log and the request counter; never logs bodies."""

    def __init__(self, metrics: Metrics, hosts: frozenset[str], tracing: Tracing | None = None) -> None:
        self.metrics = metrics
        self.hosts = hosts
        self.tracing = tracing or Tracing()

    @staticmethod
    def host_refusal(host: str) -> ASGIResponse:
        error = InvalidRequest(f"Host '{host}' is not served here; add it to server.allowed_hosts if it should be",
                               code="invalid_host")
        return ASGIResponse(body=msgspec.json.encode(error.to_body()), status_code=400, media_type="application/json")

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        headers = dict(scope["headers"])
        host = host_of(headers.get(b"host", b""))
        if "*" not in self.hosts and host not in self.hosts:
            log.warning("request.bad_host", host=host[:100], path=scope["path"])
            await self.host_refusal(host[:100])(scope, receive, send)
            return
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            with self.tracing.server_span(scope, headers) as span:  # routed by now: named by the route's template
                try:
                    await next_app(scope, receive, send_wrapper)
                except (ApplianceError, HTTPException) as exc:  # raised by inner middleware (auth), answered outside
                    status = exc.status_code
                    raise
                finally:
                    self.tracing.end_server_span(span, status)
        finally:
            elapsed = time.perf_counter() - started
            # the route's template (`/v1/responses/{response_id}`), not the path: ids in paths would make a label
            # value per id
            route = (scope.get("path_template") or scope["path"]) if scope.get("route_handler") else "unmatched"
            # the model as the client named it, once the answer shows it was served or queued for (2xx, 429, 5xx):
            # the name in a refused request may be anything a client typed, and each would make series of its own
            model = scope["state"].get("model", "") if status < 400 or status == 429 or status >= 500 else ""
            self.metrics.requests.labels(route, model, str(status)).inc()
            self.metrics.request_seconds.labels(route, model).observe(elapsed)
            log.info("request", method=scope.get("method"), path=scope["path"], status=status,
                     ms=round(elapsed * 1000, 1))
            structlog.contextvars.unbind_contextvars("request_id")


class AuthMiddleware(AbstractAuthenticationMiddleware):
    """An API key in `Authorization: Bearer ...` (then cookies are ignored), or else the web UI session cookie;
    a state-changing request made with the cookie must also carry the session's CSRF token (X-CSRF-Token)."""

    async def authenticate_request(self, connection: Any) -> AuthenticationResult:
        services: Services = connection.app.state.services
        with services.telemetry.tracing.step("auth"):
            return self._authenticate(services, connection)

    def _authenticate(self, services: Services, connection: Any) -> AuthenticationResult:
        authorization = connection.headers.get("authorization")
        token = None if authorization else connection.cookies.get(cookie_name(connection.scope["scheme"] == "https"))
        if not token:
            principal = services.keys.authenticate(authorization)
            return AuthenticationResult(user=principal, auth=principal.key_id)
        session = services.sessions.authenticate(token)
        if connection.scope.get("method") in STATE_CHANGING_METHODS:
            check_csrf(session, connection.headers.get("x-csrf-token"))
        return AuthenticationResult(user=session, auth=session.session_id)


async def add_security_headers(message: Message, scope: Scope) -> None:
    """CSP, nosniff, referrer and frame policy on every response, errors included (an error raised by the auth
    middleware is answered outside the middleware stack, so this runs where Litestar sends, not in a middleware)."""
    if message["type"] == "http.response.start":
        message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]


@get("/healthz", summary="Liveness", opt=permission(PUBLIC))
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="Readiness: the default model is loaded (and the Chroma server answers, when there is one)",
     opt=permission(PUBLIC))
async def readyz(state: State) -> Response[dict[str, str]]:
    services: Services = state.services
    ready = services.pool.is_ready(services.settings.models.default) and await services.rag.vectors_ready()
    return Response({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)


@get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4",
     opt=permission("metrics:read"))
async def metrics(state: State) -> bytes:
    services: Services = state.services
    await services.telemetry.refresh()  # vLLM workers' own metrics, read over their sockets
    services.rollout.refresh_metrics()  # bandit aliases' shares (SQLite is read here, on the event loop)
    return await asyncio.to_thread(services.metrics.render)  # NVML reads may take milliseconds


def create_app(settings: Settings, loaded: LoadedSettings | None = None) -> Litestar:
    """`loaded`: the settings with where each value came from (`load_settings`), shown by /api/settings."""
    services = Services(settings, loaded)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with services.pool:
            default = settings.models.default
            if services.registry.find(default) is None:
                log.error("model.default_missing", model=default,
                          hint=f"run `appliance models pull {default}`; /readyz stays 503 until then")
            else:
                services.pool.start_loading(default)
            # open the RAG indexes (repairing after a crash), then run again the ingestion jobs a stop interrupted
            rag_open = asyncio.create_task(services.rag.resume_jobs())
            rag_watch = asyncio.create_task(services.rag.watch_vectors())  # a Chroma server back after an outage
            purging = asyncio.create_task(services.privacy.retention.run_periodic())  # the retention job
            sampling = asyncio.create_task(services.dashboard.run())  # the dashboard's TTFT window
            alerting = asyncio.create_task(services.alerts.run())  # the alert rules, delivery, audit chain checks
            trimming = asyncio.create_task(memory.trim_periodically())  # free pages back to the system
            yield
            trimming.cancel()
            alerting.cancel()
            sampling.cancel()
            await services.rollout.close()
            services.ledger.flush()  # the responses noted in the last second
            purging.cancel()
            rag_open.cancel()
            rag_watch.cancel()
        services.rag.close()
        services.embeddings.close()
        services._folders.close()
        services.response_cache.close()
        services.conn.close()
        services.telemetry.close()  # the spans still pending are exported

    return document_errors(Litestar(
        route_handlers=[healthz, readyz, metrics, OpenAIController, ResponsesController, *AUTH_ROUTES, *OIDC_ROUTES,
                        *KEYS_ROUTES,
                        *USERS_ROUTES, *PRIVACY_ROUTES, *AUDIT_ROUTES, *CACHE_ROUTES, *RAG_ROUTES, *MODELS_ROUTES,
                        *DASHBOARD_ROUTES, *ALERTS_ROUTES, *SETTINGS_ROUTES,
                        *USAGE_ROUTES, *POLICIES_ROUTES, *MODEL_JOBS_ROUTES, *FEEDBACK_ROUTES, *WATERMARK_ROUTES,
                        *WEBUI_ROUTES],
        dependencies={
            "completions": Provide(lambda: services.completions, sync_to_thread=False),
            "models": Provide(lambda: services.registry, sync_to_thread=False),
            "rollout": Provide(lambda: services.rollout, sync_to_thread=False),
            "api_keys": Provide(lambda: services.keys, sync_to_thread=False),
            "users": Provide(lambda: services.users, sync_to_thread=False),
            "audit_log": Provide(lambda: services.audit, sync_to_thread=False),
            "rag": Provide(lambda: services.rag, sync_to_thread=False),
            "embeddings": Provide(lambda: services.embeddings_api, sync_to_thread=False),
            "response_cache": Provide(lambda: services.response_cache, sync_to_thread=False),
            "dashboard": Provide(lambda: services.dashboard, sync_to_thread=False),
            "alerts": Provide(lambda: services.alerts, sync_to_thread=False),
            "settings_view": Provide(lambda: services.settings_view, sync_to_thread=False),
        },
        state=State({"services": services}),
        lifespan=[lifespan],
        middleware=[
            RequestContextMiddleware(services.metrics, allowed_hosts(settings), services.telemetry.tracing),
            lambda app: AuthMiddleware(app, exclude=[*(f"^{p}$" for p in PUBLIC_PATHS), *UI_PATHS]),
        ],
        exception_handlers={ApplianceError: lambda _, exc: error_response(exc),
                            HTTPException: http_error_response, Exception: unexpected_error_response},
        openapi_config=OpenAPIConfig(title="Appliance", version=__version__, path="/schema", openapi_router=Router(
            path="/schema", route_handlers=[], opt=permission("metrics:read"))),
        guards=[permission_guard],
        before_send=[add_security_headers],
        request_max_body_size=settings.server.max_body_bytes,
        logging_config=None,
        debug=False,
    ))

