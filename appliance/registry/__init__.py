"""Model store and registry: catalog, sources, content-addressed blobs, records in SQLite."""
