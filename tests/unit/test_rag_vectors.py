"""The Chroma server's address, token and failures as the rest of the appliance sees them (no server needed; the
real server is in tests/integration/test_rag_chroma_server.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from appliance.config import RagSettings
from appliance.errors import InvalidRequest
from appliance.rag.vectors import (
    TOKEN_NAME,
    VECTOR_STORE,
    ChromaServer,
    GatewayDown,
    Refused,
    VectorStore,
    VectorStoreUnavailable,
    _status,
    reaching,
    token_store,
)
from appliance.storage import StorageFull


def server(tmp_path: Path, url: str = "https://user:pw@chroma.example:8443/base", **extra: str) -> ChromaServer:
    found = ChromaServer.from_settings(RagSettings(chroma_url=url, **extra), tmp_path)  # type: ignore[arg-type]
    assert found is not None
    return found


def test_no_url_means_embedded(tmp_path: Path) -> None:
    assert ChromaServer.from_settings(RagSettings(), tmp_path) is None


def test_the_token_is_kept_in_a_0600_file_and_sent_in_the_header_chosen(tmp_path: Path) -> None:
    assert server(tmp_path).headers() == {}
    token_store(tmp_path).save(TOKEN_NAME, "s3cret\n")
    assert (tmp_path / "chroma" / "server.key").stat().st_mode & 0o777 == 0o600
    assert server(tmp_path).headers() == {"Authorization": "Bearer s3cret"}
    assert server(tmp_path, chroma_auth_header="x-chroma-token").headers() == {"X-Chroma-Token": "s3cret"}
    with pytest.raises(InvalidRequest, match="Chroma server token"):
        token_store(tmp_path).save(TOKEN_NAME, "two words")


def test_messages_name_the_server_without_its_password(tmp_path: Path) -> None:
    chroma = server(tmp_path)
    assert chroma.where == "https://chroma.example:8443"
    error = chroma.unavailable("ConnectError")
    assert error.status_code == 503 and error.headers() == {"retry-after": "5"} and "pw" not in error.message


class Index:
    def __init__(self, where: ChromaServer | None) -> None:
        self.server = where

    @reaching(lambda self: self.server)
    def call(self, exc: Exception) -> None:
        raise exc


def test_lost_connections_become_503s_only_with_a_server(tmp_path: Path) -> None:
    with pytest.raises(VectorStoreUnavailable) as down:
        Index(server(tmp_path)).call(httpx.ConnectError("refused"))
    assert down.value.code == "vector_store_unavailable" and down.value.retry_after
    with pytest.raises(VectorStoreUnavailable) as refused:
        Index(server(tmp_path)).call(Refused("HTTP 401"))
    assert refused.value.code == "vector_store_refused" and "chroma-token" in refused.value.message
    with pytest.raises(httpx.ConnectError):
        Index(None).call(httpx.ConnectError("embedded Chroma makes no connections; this is a bug, not an outage"))
    with pytest.raises(KeyError):
        Index(server(tmp_path)).call(KeyError("other errors pass through"))


def test_a_proxy_s_502_and_401_are_told_apart_from_other_errors() -> None:
    request = httpx.Request("GET", "http://chroma/api/v2/heartbeat")
    with pytest.raises(GatewayDown):
        _status(httpx.Response(502, request=request))
    with pytest.raises(Refused):
        _status(httpx.Response(401, request=request))
    _status(httpx.Response(404, request=request))  # chromadb's own errors stay chromadb's


def test_a_full_disk_names_the_local_folder_only_for_embedded_chroma(tmp_path: Path) -> None:
    # the text of Chroma's engine for SQLITE_FULL, as chromadb raises it (embedded) or relays it (a server's 500)
    full = RuntimeError("Error executing plan: error returned from database: (code: 13) database or disk is full")
    with pytest.raises(StorageFull) as here, VectorStore(tmp_path, None, "ns").writing():
        raise full
    assert (here.value.store, here.value.path) == (VECTOR_STORE, str(tmp_path / "chroma"))
    remote = VectorStore(tmp_path, server(tmp_path), "ns")
    with pytest.raises(StorageFull) as there, remote.writing():
        raise full
    assert there.value.status_code == 507 and there.value.path is None
    assert "Chroma server at https://chroma.example:8443" in there.value.store
    assert str(tmp_path) not in there.value.message  # no local folder is full
    with pytest.raises(httpx.ConnectError), remote.writing():  # unreachable is not full: `reaching` makes it a 503
        raise httpx.ConnectError("refused")
    with pytest.raises(KeyError), remote.writing():
        raise KeyError("other errors pass through")
