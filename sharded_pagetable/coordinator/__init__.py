"""The coordinator (``ShardedPageTable``), what it needs of a backend, and the local backend."""
