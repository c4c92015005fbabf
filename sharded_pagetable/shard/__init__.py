"""The shard side: messages and their wire format, checksums, kernels, device buffers, a shard."""
