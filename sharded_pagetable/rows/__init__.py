"""Row mechanics below both tables: batch messages, checksums, the compiled row kernels and
donated device updates, used alike by the single-process table and by every shard."""
