"""The RAG API of DESIGN section 4: collections, documents (JSON or multipart upload), queries, ingestion jobs and
the consistency check; thin handlers over `appliance.rag.service.RagService`."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery

from appliance.admin.keys_routes import decode_body
from appliance.auth.guards import permission
from appliance.errors import InvalidRequest
from appliance.rag.jobs import Incoming
from appliance.rag.parsers import detect_kind
from appliance.rag.service import DocumentBatch, DocumentBody, NewCollection, QueryRequest, RagService

TAGS = ["RAG"]
DOCUMENT_EXAMPLE = '{"id": "handbook", "text": "...", "metadata": {"source": "intranet"}, "format": "markdown"}'


@get("/api/collections", summary="List the collections the caller may read", opt=permission("rag:read"), tags=TAGS)
async def list_collections(request: Request[Any, Any, Any], rag: NamedDependency[RagService]) -> dict[str, Any]:
    return {"object": "list", "data": rag.list_collections(request.user)}


@post("/api/collections", summary="Create a collection owned by the caller", opt=permission("rag:write"), tags=TAGS)
async def create_collection(request: Request[Any, Any, Any], rag: NamedDependency[RagService]
                            ) -> Response[dict[str, Any]]:
    body = decode_body(await request.body(), NewCollection, '{"name": "handbook", "readers": ["role:user"]}')
    return Response(await rag.create_collection(request.user, body.name, body.readers, body.writers),
                    status_code=201)


@delete("/api/collections/{name:str}", summary="Delete a collection and every document in it", status_code=200,
        opt=permission("rag:write"), tags=TAGS)
async def delete_collection(request: Request[Any, Any, Any], name: FromPath[str], rag: NamedDependency[RagService]
                            ) -> dict[str, Any]:
    await rag.delete_collection(request.user, name)
    return {"object": "collection", "name": name, "deleted": True}


@get("/api/collections/{name:str}/documents", summary="List a collection's documents with their chunk counts",
     opt=permission("rag:read"), tags=TAGS)
async def list_documents(request: Request[Any, Any, Any], name: FromPath[str], rag: NamedDependency[RagService]
                         ) -> dict[str, Any]:
    return {"object": "list", "data": rag.list_documents(request.user, name)}


@post("/api/collections/{name:str}/documents", opt=permission("rag:write"), tags=TAGS,
      summary="Add or replace documents: JSON {id, text, metadata, format}, or {documents: [...]} for many at "
              "once, or a multipart file upload (txt, md, html, pdf); large ones become a job (202)")
async def add_document(request: Request[Any, Any, Any], name: FromPath[str], rag: NamedDependency[RagService]
                       ) -> Response[dict[str, Any]]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("the multipart upload needs a part named 'file'", param="file", code="missing_file")
        data = await upload.read()
        kind = detect_kind(upload.filename, upload.content_type, data[:8])
        document_id = str(form.get("id") or upload.filename or "")
        result = await rag.add_document(request.user, name, document_id, data, kind,
                                        {"filename": upload.filename or ""})
    else:
        raw = await request.body()
        batch = (decode_body(raw, DocumentBatch, f'{{"documents": [{DOCUMENT_EXAMPLE}]}}').documents
                 if raw.lstrip().startswith(b'{"documents"') else [decode_body(raw, DocumentBody, DOCUMENT_EXAMPLE)])
        result = await rag.add_documents(request.user, name, [
            Incoming(d.id, d.text.encode(), d.format, dict(d.metadata)) for d in batch])
    return Response(result, status_code=202 if result["object"] == "ingestion.job" else 201)


@delete("/api/collections/{name:str}/documents/{document_id:path}", summary="Delete a document from both indexes",
        status_code=200, opt=permission("rag:write"), tags=TAGS)
async def delete_document(request: Request[Any, Any, Any], name: FromPath[str], document_id: FromPath[str],
                          rag: NamedDependency[RagService]) -> dict[str, Any]:
    document_id = document_id.lstrip("/")
    await rag.delete_document(request.user, name, document_id)
    return {"object": "document", "id": document_id, "deleted": True}


@post("/api/collections/{name:str}/query", summary="Retrieve chunks: hybrid (default), vector or keyword",
      status_code=200, opt=permission("rag:read"), tags=TAGS)
async def query(request: Request[Any, Any, Any], name: FromPath[str], rag: NamedDependency[RagService]
                ) -> dict[str, Any]:
    body = decode_body(await request.body(), QueryRequest, '{"query": "how do I ...", "top_k": 5, "mode": "hybrid"}')
    results = await rag.query(request.user, [name], body.query, body.top_k, body.mode, body.per_document)
    return {"object": "list", "mode": body.mode, "data": [r.view() for r in results]}


@get("/api/jobs/{job_id:str}", summary="Progress of an ingestion job", opt=permission("rag:write"), tags=TAGS)
async def job(request: Request[Any, Any, Any], job_id: FromPath[str], rag: NamedDependency[RagService]
              ) -> dict[str, Any]:
    return rag.job(request.user, job_id)


@post("/api/rag/check", summary="Compare Chroma and the keyword index; ?repair=true fixes what differs",
      status_code=200, opt=permission("rag:admin"), tags=TAGS)
async def check(rag: NamedDependency[RagService], repair: FromQuery[bool] = False) -> dict[str, Any]:
    report = await rag.check(repair)
    return {"consistent": report.consistent, **report.__dict__}


ROUTES = [list_collections, create_collection, delete_collection, list_documents, add_document, delete_document,
          query, job, check]
