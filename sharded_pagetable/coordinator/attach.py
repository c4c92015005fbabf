"""Attach: a new coordinator rebuilds its mirror from shards that outlived the old one."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..routing.layout import ShardLayout
from ..table.host import HostRows
from .backend import Backend
from .epochs import failures, shard_sums

log = logging.getLogger(__name__)


def adopt(
    backend: Backend, hosts: Sequence[HostRows], layout: ShardLayout, generation: int
) -> tuple[int, list[int]]:
    """Settle the (already fenced) shards on the newest epoch every one of them can present,
    load their rows into the empty mirror ``hosts`` as published, and return that epoch
    with each shard's checksum. Shards one epoch ahead (a commit the old coordinator never
    finished) step back; anything else that does not add up raises ``RuntimeError`` before
    the mirror is trusted."""
    epochs = [a.epoch for a in backend.status()]
    target = min(epochs)
    if max(epochs) - target > 1:
        raise RuntimeError(f"shards hold epochs {epochs}: more than one epoch apart, cannot settle")
    ahead = [s for s, e in enumerate(epochs) if e > target]
    if ahead:
        for s, res in zip(ahead, backend.rollback(ahead, target + 1, generation), strict=True):
            if isinstance(res, BaseException) or res.epoch != target:
                raise RuntimeError(f"shard {s} cannot step back to epoch {target}: {res}")
        log.warning("shards %s stepped back to epoch %d to settle", ahead, target)
    for s, state in enumerate(backend.export(generation)):
        if state is None:
            continue
        if state.epoch != target or state.shard != s:
            raise RuntimeError(f"shard {s} exported epoch {state.epoch}, expected {target}")
        for host, group in zip(hosts, state.groups, strict=True):
            host.load(layout.shard_rows(s).start, group)
    expected = shard_sums(hosts, layout)
    failed = failures(backend.status(), expected, target, "reports after attach")
    if failed:
        raise RuntimeError(f"shard {failed[0][0]}: {failed[0][1]}")
    return target, expected
