"""Ray calls to shard actors that report per shard: a result, or what went wrong there."""

from __future__ import annotations

import time
from typing import Any

import ray


class ShardTimeoutError(TimeoutError):
    """A shard did not answer within ``ray.timeout_s``."""


def per_shard(refs: list, timeout: float) -> list[Any]:
    """Per-ref result or the exception it raised; a ref not ready in time gets a
    :class:`ShardTimeoutError` (refs are in shard order)."""
    deadline = time.monotonic() + timeout
    try:
        return ray.get(refs, timeout=timeout)
    except Exception:
        pass  # one ref failed (or time ran out): resolve each ref on its own
    remaining = max(0.0, deadline - time.monotonic())
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=remaining)
    ready_set = set(ready)
    out: list[Any] = []
    for i, ref in enumerate(refs):
        if ref not in ready_set:
            out.append(ShardTimeoutError(f"shard {i} did not answer within {timeout}s"))
            continue
        try:
            out.append(ray.get(ref))
        except Exception as exc:
            out.append(exc)
    return out
