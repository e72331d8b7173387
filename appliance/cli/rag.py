"""`appliance rag check [--repair]`: compare Chroma and the keyword index (the server must be stopped: both are
owned by one process; while it runs, use `POST /api/rag/check?repair=true`). `appliance rag chroma-token`: the
token of the Chroma server named by `[rag] chroma_url`, read from stdin."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from appliance.auth.rbac import Rbac
from appliance.cli.common import Add, cli_actor, open_audit
from appliance.config import LoadedSettings
from appliance.datadir import DataDir
from appliance.observability.metrics import Metrics
from appliance.rag.embeddings import EmbeddingService
from appliance.rag.service import RagService
from appliance.rag.vectors import TOKEN_NAME, ChromaServer, token_store


def cmd_rag_check(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    settings = loaded.settings
    data = DataDir(settings.data_path)
    data.require_initialised()
    metrics = Metrics()
    embeddings = EmbeddingService(settings.rag, data.cache / "embeddings", metrics)
    rag = RagService(settings.rag, data.rag, embeddings, Rbac.load(settings.auth.rbac_file), metrics,
                     repair_on_open=False, server=ChromaServer.from_settings(settings.rag, data.keys))
    try:
        report = asyncio.run(rag.check(repair=args.repair))
    finally:
        rag.close()
        embeddings.close()
    print(json.dumps({"consistent": report.consistent, **report.__dict__}, indent=2))
    if report.consistent or args.repair:
        print(f"{report.collections} collections, {report.documents} documents, {report.chunks} chunks: "
              + ("consistent" if report.consistent else "repaired; run the check again to confirm"))
        return 0
    print("the indexes differ (see above); run `appliance rag check --repair` to fix them")
    return 1


def cmd_rag_chroma_token(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.audit import audited

    data = DataDir(loaded.settings.data_path)
    audit = open_audit(data)
    tokens = token_store(data.keys)
    if not args.clear and sys.stdin.isatty():
        print("paste the Chroma server's token, then press Enter:", file=sys.stderr)
    token = "" if args.clear else sys.stdin.readline()
    with audited(audit, cli_actor(), "rag.chroma_token.set", "chroma", removed=args.clear):
        if args.clear:
            tokens.delete(TOKEN_NAME)
        else:
            tokens.save(TOKEN_NAME, token)
    where = loaded.settings.rag.chroma_url or "none yet: set [rag] chroma_url"
    print(f"the Chroma server token is {'removed' if args.clear else 'stored'} (server: {where}); restart the "
          "appliance to use it")
    return 0


def register(sub: Any, add: Add) -> None:
    rag = sub.add_parser("rag", help="the RAG indexes").add_subparsers(dest="sub", required=True)
    check = add("check", cmd_rag_check, "compare Chroma and the keyword index; --repair fixes what differs (the "
                "server must be stopped)", rag)
    check.add_argument("--repair", action="store_true", help="finish interrupted ingestion, drop orphan vectors, "
                       "re-embed missing ones")
    token = add("chroma-token", cmd_rag_chroma_token, "set the Chroma server's token (read from stdin, kept in a 0600 "
                "file under keys/, never shown)", rag)
    token.add_argument("--clear", action="store_true", help="remove the token")
