"""Loaded by the server under test (PYTHONPATH) and its workers, never by the product.

APPLIANCE_TEST_NET_LOG=FILE: any attempt to reach beyond loopback is written to FILE and fails as an unreachable
network would (a Python audit hook on socket.connect and getaddrinfo).
APPLIANCE_TEST_RAG_CRASH_DOC=ID and APPLIANCE_TEST_RAG_CRASH_AT=STEP: the process kills itself (SIGKILL) at that
step of ingesting that document (appliance.rag.index.RagIndex.put_document's crash hook).
APPLIANCE_TEST_RAG_PAUSE_DOC=ID, APPLIANCE_TEST_RAG_PAUSE_AT=STEP and APPLIANCE_TEST_RAG_PAUSE_FILE=F: the first time
ingestion of that document reaches that step, F.paused is created and ingestion waits until F.go exists (the test
does something to the world in between, e.g. kills the Chroma server)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

LOCAL = {None, "", "localhost", "127.0.0.1", "::1", b"localhost", b"127.0.0.1"}

if log_path := os.environ.get("APPLIANCE_TEST_NET_LOG"):

    def _refuse(what: str) -> None:
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()} {' '.join(sys.argv[:3])}: {what}\n")
        raise OSError(101, "Network is unreachable (test)")

    def _hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple) and address[0] not in LOCAL:
                _refuse(f"connect {address!r}")
        elif event == "socket.getaddrinfo" and args[0] not in LOCAL:
            _refuse(f"getaddrinfo {args[0]!r}")

    sys.addaudithook(_hook)

if (crash_doc := os.environ.get("APPLIANCE_TEST_RAG_CRASH_DOC")) and "serve" in sys.argv:
    crash_at = os.environ.get("APPLIANCE_TEST_RAG_CRASH_AT", "vectors")
    from appliance.rag import index as _index

    _put = _index.RagIndex.put_documents

    def _put_and_crash(self: Any, collection_id: str, documents: Any, added_by: str, *_: Any, **__: Any) -> None:
        def hook(step: str) -> None:
            if step == crash_at and any(d.id == crash_doc for d in documents):
                os.kill(os.getpid(), signal.SIGKILL)

        _put(self, collection_id, documents, added_by, hook)

    _index.RagIndex.put_documents = _put_and_crash  # type: ignore[method-assign]

if (pause_doc := os.environ.get("APPLIANCE_TEST_RAG_PAUSE_DOC")) and "serve" in sys.argv:
    pause_at = os.environ.get("APPLIANCE_TEST_RAG_PAUSE_AT", "pending")
    pause_file = Path(os.environ["APPLIANCE_TEST_RAG_PAUSE_FILE"])
    from appliance.rag import index as _pausing_index

    _put_first = _pausing_index.RagIndex.put_documents

    def _put_and_pause(self: Any, collection_id: str, documents: Any, added_by: str, *_: Any, **__: Any) -> None:
        def hook(step: str) -> None:
            paused, go = pause_file.with_suffix(".paused"), pause_file.with_suffix(".go")
            if step == pause_at and any(d.id == pause_doc for d in documents) and not paused.exists():
                paused.touch()
                while not go.exists():
                    time.sleep(0.02)

        _put_first(self, collection_id, documents, added_by, hook)

    _pausing_index.RagIndex.put_documents = _put_and_pause  # type: ignore[method-assign]
