"""KV copy plans: which pages' KV must reach which pages before attention reads them.

A plan is ``i32[2, K]`` (source page, destination page) sorted by destination, each
destination once, and all its copies read before any writes. Copies still owed are kept as
a ``{destination: source}`` map that new copies are composed onto: the host table composes
the row moves of an epoch, a shard the plans of every epoch until a model step takes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

NO_COPIES = np.zeros((2, 0), np.int32)  # i32[2, 0]
NO_COPIES.flags.writeable = False  # shared by every empty plan


def compose(pending: dict[int, int], src: Sequence[int], dst: Sequence[int]) -> None:
    """Add the copies ``src[i] -> dst[i]`` (all read before any is written) to ``pending``
    (destination -> source page), in place. A source that is itself a pending destination
    resolves to the page that holds the KV now, so a chain of moves copies once; a copy
    whose resolved source is its own destination (a row moved back) needs none, and
    cancels any copy still pending into that page."""
    resolved = [pending.get(s, s) for s in src]
    for s, d in zip(resolved, dst, strict=True):
        if s == d:
            pending.pop(d, None)
        else:
            pending[d] = s


def plan_of(pending: Mapping[int, int]) -> np.ndarray:
    """``i32[2, K]`` (source, destination) of ``pending``, sorted by destination."""
    if not pending:
        return NO_COPIES
    dst = sorted(pending)
    return np.array([[pending[d] for d in dst], dst], dtype=np.int32)
