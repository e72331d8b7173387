"""RAG documents as a privacy store (`appliance.privacy.retention.ErasableStore`, data class `rag_documents`):
purged by age (the document's last write), erased by subject (what they added, and the collections they own), and
compacted so deleted text leaves no trace: the FTS5 index is merged ('optimize' drops the deleted entries from its
segments), its database vacuumed and its WAL truncated. Chroma holds vectors and ids only, never text; its
deleted records are compacted by Chroma itself."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from appliance.privacy.retention import StoreReport, Subject

if TYPE_CHECKING:
    from appliance.rag.service import RagService


class RagDocumentStore:
    data_class = "rag_documents"

    def __init__(self, rag: RagService) -> None:
        self.rag = rag

    def purge_older_than(self, cutoff: datetime) -> int:
        index = self.rag.index
        stale = self._stale(cutoff)
        for collection_id, document_id in stale:
            index.delete_document(collection_id, document_id)
        return len(stale)

    def count_older_than(self, cutoff: datetime) -> int:
        return len(self._stale(cutoff))

    def _stale(self, cutoff: datetime) -> list[tuple[str, str]]:
        return self.rag.index.documents_where("updated_at < ?", cutoff.astimezone(UTC).isoformat(timespec="seconds"))

    def erase_subject(self, subject: Subject) -> int:
        ids = sorted(subject.principals)
        if not ids:
            return 0
        index = self.rag.index
        marks = ",".join("?" * len(ids))
        erased = 0
        for collection in index.collections():
            if collection["owner"] in ids:
                erased += collection.get("documents", 0)
                index.delete_collection(collection["id"])
        for collection_id, document_id in index.documents_where(f"added_by IN ({marks})", *ids):
            erased += index.delete_document(collection_id, document_id)
        return erased

    def report(self) -> StoreReport:
        count, oldest = self.rag.index.document_stats()
        return StoreReport(self.data_class, count, datetime.fromisoformat(oldest) if oldest else None)

    def compact(self) -> None:
        self.rag.index.compact()
