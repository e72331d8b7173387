"""The response cache of DESIGN section 2, step 6: exact (diskcache, bytes only) and semantic (prompt embeddings),
partitioned by tenant and model version."""
