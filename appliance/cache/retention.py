"""Cache entries under the privacy policy's retention (`cache_entries`) and erasure: the response cache as an
`appliance.privacy.ErasableStore`, registered by the composition root with `services.privacy.retention`."""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta

import diskcache

from appliance.cache.service import ResponseCacheService
from appliance.privacy.retention import StoreReport, Subject, compact_sqlite


class CacheEntriesStore:
    data_class = "cache_entries"

    def __init__(self, service: ResponseCacheService) -> None:
        self.service = service

    def purge_older_than(self, cutoff: datetime) -> int:
        return self.service.purge_older_than((datetime.now(UTC) - cutoff).total_seconds())

    def count_older_than(self, cutoff: datetime) -> int:
        return self.service.cache.count_older_than((datetime.now(UTC) - cutoff).total_seconds())

    def erase_subject(self, subject: Subject) -> int:
        """The subject's own partitions (their user and their keys), and what they added to shared ones."""
        return sum(self.service.erase_partition(p) for p in sorted(subject.principals)) + \
            self.service.erase_owner(subject.principals)

    def report(self) -> StoreReport:
        report = self.service.report()
        oldest = None
        if report.oldest_age_seconds is not None:
            oldest = datetime.now(UTC) - timedelta(seconds=report.oldest_age_seconds)
        return StoreReport(self.data_class, report.entries, oldest,
                           f"{report.bytes} bytes in {len(report.partitions)} partitions")

    def compact(self) -> None:
        """Deleted entries leave no trace: expired ones go, and the database drops its free pages and WAL."""
        cache = self.service.cache
        cache.expire()
        with contextlib.closing(sqlite3.connect(cache.directory / diskcache.core.DBNAME, timeout=60)) as conn:
            compact_sqlite(conn)
