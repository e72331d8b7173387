"""Where RAG's vectors live: Chroma embedded (a PersistentClient under `rag/chroma`), or a Chroma server
(`[rag] chroma_url`, `chromadb.HttpClient`) when one box is not enough (DESIGN section 6).

Either way Chroma holds vectors, random keys and chunk positions only: no text, no document id, no collection
name. On a server, this appliance's collections live in a database of their own (`appliance-<id>`, the id made once
per data dir), so several appliances can share one server. The server's token is a secret kept like the remote
engine's upstream keys (a 0600 file under `keys/`), sent only in the header Chroma's token auth reads."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import httpx

from appliance.config import RagSettings
from appliance.crypto.secret_files import SecretFiles
from appliance.errors import ApplianceError
from appliance.storage import StorageFull, full_disk_is, is_disk_full

VECTOR_STORE = "the vector index (Chroma)"

RETRY_AFTER = 5.0  # seconds a client is told to wait when the server is unreachable
HEARTBEAT_TIMEOUT = 2.0
HEARTBEAT_TTL = 2.0  # /readyz asks at most this often
# chromadb's HttpClient waits forever by default: a server that hangs would hang ingestion and queries with it
REQUEST_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
P = ParamSpec("P")
R = TypeVar("R")


class VectorStoreUnavailable(ApplianceError):
    """The Chroma server cannot be reached (or refuses this appliance's token): RAG routes answer 503."""

    status_code = 503
    error_type = "server_error"
    code = "vector_store_unavailable"


class GatewayDown(httpx.TransportError):
    """A proxy in front of the Chroma server answered 502, 503 or 504: the server behind it is down."""


class Refused(Exception):
    """The Chroma server (or the proxy in front of it) answered 401 or 403: the token is missing or wrong."""


def token_store(keys: Path) -> SecretFiles:
    """The Chroma server's token: `keys/chroma/server.key`, 0600, like an upstream model's API key."""
    return SecretFiles(keys / "chroma", "Chroma server token")


TOKEN_NAME = "server"  # noqa: S105 (the file's name, not a token)


@dataclass(frozen=True)
class ChromaServer:
    """A Chroma server's address and credentials. Importing chromadb is slow, so /readyz probes the server with
    plain httpx instead of a client."""

    url: str
    tenant: str
    database: str  # empty: this data dir's own `appliance-<id>`
    token: str | None
    header: str

    @classmethod
    def from_settings(cls, settings: RagSettings, keys: Path) -> ChromaServer | None:
        if not settings.chroma_url:
            return None
        token = token_store(keys).load(TOKEN_NAME)
        return cls(settings.chroma_url.rstrip("/"), settings.chroma_tenant, settings.chroma_database, token,
                   settings.chroma_auth_header)

    @property
    def where(self) -> str:
        """The server's address for messages: scheme, host and port, never a password in the URL."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"

    def headers(self) -> dict[str, str]:
        if not self.token:
            return {}
        if self.header == "authorization":
            return {"Authorization": f"Bearer {self.token}"}
        return {"X-Chroma-Token": self.token}

    def unavailable(self, why: str) -> VectorStoreUnavailable:
        return VectorStoreUnavailable(
            f"the Chroma server at {self.where} cannot be reached ({why}); documents cannot be added and vector or "
            "hybrid queries cannot run until it is back (keyword queries still work)", retry_after=RETRY_AFTER)

    def heartbeat(self, timeout: float = HEARTBEAT_TIMEOUT) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/api/v2/heartbeat", headers=self.headers(), timeout=timeout).is_success
        return False


class ServerProbe:
    """Whether the Chroma server answers, asked at most every HEARTBEAT_TTL seconds (for /readyz)."""

    def __init__(self, server: ChromaServer) -> None:
        self.server = server
        self._at = -HEARTBEAT_TTL
        self._up = False
        self._lock = threading.Lock()

    def up(self) -> bool:
        with self._lock:
            if time.monotonic() - self._at >= HEARTBEAT_TTL:
                self._up = self.server.heartbeat()
                self._at = time.monotonic()
            return self._up

    def saw(self, up: bool) -> None:
        """What a real request just found (a failure shows at once, without waiting for the next probe)."""
        with self._lock:
            self._up, self._at = up, time.monotonic()


def reaching(server: Callable[[Any], ChromaServer | None]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn a lost connection to the Chroma server, inside the decorated method, into VectorStoreUnavailable (503
    with Retry-After). `server(self)` is the method's server, None when Chroma is embedded."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except httpx.TransportError as exc:
                where = server(args[0])
                if where is None:
                    raise
                raise where.unavailable(type(exc).__name__) from exc
            except Exception as exc:
                where = server(args[0])
                refused = isinstance(exc, Refused) or type(exc).__name__ in ("ChromaAuthError", "AuthorizationError")
                if where is None or not refused:
                    raise
                raise VectorStoreUnavailable(
                    f"the Chroma server at {where.where} refused this appliance's "
                    "token; set the right one with `appliance rag chroma-token` (it reads stdin)",
                    code="vector_store_refused") from exc

        return wrapper

    return decorate


@contextlib.contextmanager
def _server_full(server: ChromaServer) -> Iterator[None]:
    try:
        yield
    except httpx.TransportError:  # unreachable, not full: `reaching` makes it the 503
        raise
    except Exception as exc:
        if isinstance(exc, StorageFull) or not is_disk_full(exc):
            raise
        raise StorageFull(f"{VECTOR_STORE} on the Chroma server at {server.where}", None) from exc


class VectorStore:
    """Chroma's collections for this appliance, one per RAG collection (`c_<collection id>`), opened on first use."""

    def __init__(self, root: Path, server: ChromaServer | None, namespace: str) -> None:
        self.root = root
        self.path = root / "chroma"  # embedded Chroma's files
        self.server = server
        self.database = (server.database if server and server.database else f"appliance-{namespace}")
        self._client: Any = None
        self._collections: dict[str, Any] = {}
        self._max_batch: int | None = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        if self.server is None:
            return chromadb.PersistentClient(path=str(self.path), settings=ChromaSettings(
                anonymized_telemetry=False, allow_reset=False))
        parts = urlsplit(self.server.url)
        ssl = parts.scheme == "https"
        # the whole URL as the host: chromadb then keeps its port (or the scheme's) and any path before /api/v2
        host, port = self.server.url, parts.port or (443 if ssl else 80)
        settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
        if self.server.token:
            settings.chroma_client_auth_provider = "chromadb.auth.token_authn.TokenAuthClientProvider"
            settings.chroma_client_auth_credentials = self.server.token
            settings.chroma_auth_token_transport_header = (
                "Authorization" if self.server.header == "authorization" else "X-Chroma-Token")
        admin_settings = settings.model_copy(update={
            "chroma_api_impl": "chromadb.api.fastapi.FastAPI", "chroma_server_host": host,
            "chroma_server_http_port": port, "chroma_server_ssl_enabled": ssl})
        admin = chromadb.AdminClient(admin_settings)
        _bound(admin)
        try:
            admin.get_database(self.database, tenant=self.server.tenant)
        except Exception as exc:
            if type(exc).__name__ != "NotFoundError":
                raise
            admin.create_database(self.database, tenant=self.server.tenant)
        finally:
            if (session := _session(admin)) is not None:
                session.close()
        client = chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=settings, tenant=self.server.tenant,
                                     database=self.database)
        _bound(client)
        return client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            self._collections.clear()
        if client is not None:
            # the client's own admin client (it checks the database exists) has a session of its own
            sessions = [_session(client), _session(getattr(client, "_admin_client", None))]
            with contextlib.suppress(Exception):
                client.close()
            for session in sessions:
                if session is not None:
                    session.close()

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Around every write: embedded, a full disk is a `StorageFull` (507) naming the vector index and its folder
        here; on a server there is no local disk for the vectors, so only a full disk the server itself reports
        is one, naming the server (its lost connection is the 503 of `reaching`)."""
        if self.server is None:
            return full_disk_is(VECTOR_STORE, self.path)
        return _server_full(self.server)

    def collection(self, collection_id: str, fresh: bool = False) -> Any:
        """The collection of `c_<collection_id>`, created when missing; kept (a server round trip saved per
        query) unless `fresh`."""
        found = None if fresh else self._collections.get(collection_id)
        if found is None:
            found = self.client().get_or_create_collection(f"c_{collection_id}", embedding_function=None,
                                                           configuration={"hnsw": {"space": "cosine"}})
            self._collections[collection_id] = found
        return found

    def drop(self, collection_id: str) -> None:
        self._collections.pop(collection_id, None)
        try:
            self.client().delete_collection(f"c_{collection_id}")
        except Exception as exc:
            # already gone is fine (chromadb raises its own NotFoundError, or ValueError in older versions)
            if type(exc).__name__ not in ("NotFoundError", "ValueError", "InvalidCollectionException"):
                raise

    def collection_ids(self) -> list[str]:
        """The RAG collections that have vectors here (this appliance's database only, on a server)."""
        return [c.name.removeprefix("c_") for c in self.client().list_collections() if c.name.startswith("c_")]

    @property
    def max_batch(self) -> int:
        if self._max_batch is None:
            self._max_batch = int(self.client().get_max_batch_size())
        return self._max_batch


def _session(client: Any) -> httpx.Client | None:
    """The httpx client inside a chromadb HttpClient or AdminClient (private to chromadb, hence the care)."""
    session = getattr(getattr(client, "_server", None), "_session", None)
    return session if isinstance(session, httpx.Client) else None


def _bound(client: Any) -> None:
    """Bound chromadb's HTTP calls (it passes timeout=None to httpx), and tell a proxy's 502 or 401 from other
    errors (chromadb turns them all into a bare Exception)."""
    if (session := _session(client)) is not None:
        session.timeout = REQUEST_TIMEOUT
        session.event_hooks = {**session.event_hooks, "response": [_status]}


def _status(response: httpx.Response) -> None:
    if response.status_code in (502, 503, 504):
        raise GatewayDown(f"HTTP {response.status_code}", request=response.request)
    if response.status_code in (401, 403):
        raise Refused(f"HTTP {response.status_code}")
