"""Device-state checks that run inside every shard process through ``run_on_shards``.

They are module-level functions so Ray can ship them by reference.
"""

from __future__ import annotations

import functools

import numpy as np

_MULT = np.uint32(2654435761)


def _weights(width: int) -> np.ndarray:
    return (np.arange(width, dtype=np.uint32) * _MULT + np.uint32(1)).astype(np.uint32)


def host_row_digests(table: np.ndarray) -> np.ndarray:
    """``u32[R]`` per-row digest of a host table (the same formula as :func:`row_digests`)."""
    with np.errstate(over="ignore"):
        return (table.astype(np.uint32) * _weights(table.shape[1])).sum(axis=1, dtype=np.uint32)


@functools.lru_cache(maxsize=16)
def _digest_fn(mesh: object):
    """The jitted row digest whose result is replicated over ``mesh``; jit then compiles it
    once per table shape."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    def digest(x, w):
        return (x.astype(jnp.uint32) * w).sum(axis=1, dtype=jnp.uint32)

    return jax.jit(digest, out_shardings=NamedSharding(mesh, PartitionSpec()))


def row_digests(arrays: list, *_: object) -> list[np.ndarray]:
    """Per group, ``u32[R]`` row digests of the global device array, computed by one jitted
    SPMD program across every shard process and replicated to each of them."""
    import jax.numpy as jnp

    return [
        np.asarray(_digest_fn(arr.sharding.mesh)(arr, jnp.asarray(_weights(arr.shape[1]))))
        for arr in arrays
    ]


def local_row_digests(arrays: list, *_: object) -> list[list[tuple[int, np.ndarray]]]:
    """Per group, ``(first row, u32[rows] digests)`` of each block this process holds, read
    from its own devices: no program spans processes, so it works in a survivable job after
    a shard process was replaced (where no cross-process collective does, on CPU)."""
    out = []
    for arr in arrays:
        blocks = {}
        for s in arr.addressable_shards:
            start = s.index[0].start or 0
            if start not in blocks:
                blocks[start] = host_row_digests(np.asarray(s.data))
        out.append(sorted(blocks.items()))
    return out


def addressable_rows(arrays: list, *_: object) -> list[list[tuple[int, int, int]]]:
    """Per group, ``(process, first row, last row + 1)`` of each addressable shard."""
    import jax

    return [
        sorted(
            (jax.process_index(), s.index[0].start or 0, s.index[0].stop or arr.shape[0])
            for s in arr.addressable_shards
        )
        for arr in arrays
    ]
