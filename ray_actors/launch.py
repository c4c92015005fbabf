"""Starting a set of shard actors: one JAX distributed job, placed, joined and warmed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from sharded_pagetable.config import RayOptions
from sharded_pagetable.errors import ShardFailedError
from sharded_pagetable.shard.shard import ShardSpec

from .calls import per_shard
from .channel import new_keys
from .cluster import release, spread_strategies
from .shard_actor import ShardActor

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ShardSet:
    """One started set of shard actors (one JAX distributed job)."""

    actors: list[Any]
    placements: list[dict[str, Any]]
    keys: list
    pg: Any = None


def kill(actors: Sequence[Any]) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception as exc:  # already dead
            log.debug("kill failed: %s", exc)


def alive(shards: ShardSet) -> bool:
    """The set still answers (an idle standby may have died unseen)."""
    refs = [a.pid.remote() for a in shards.actors]
    return all(not isinstance(r, BaseException) for r in per_shard(refs, 10))


def launch(
    specs: Sequence[ShardSpec],
    mesh_axes: dict[str, int],
    row_axis: str,
    options: RayOptions,
    name_of: Callable[[int], str],
) -> ShardSet:
    """Start one set of shard actors: a JAX distributed job of its own, warmed up."""
    o = options
    num_shards = len(specs)
    gpu = o.platform == "gpu"
    strategies: list[Any] = [None] * num_shards
    num_cpus = o.cpus_per_shard
    pg = None
    if o.placement == "spread":
        bundle: dict[str, float] = {"CPU": o.cpus_per_shard or 0.01}
        if gpu:
            bundle["GPU"] = o.devices_per_shard
        # A detached table's group is named and detached too: Ray removes a driver's
        # placement groups (and the actors in them) when that driver exits.
        pg, strategies = spread_strategies(
            num_shards,
            bundle,
            o.timeout_s,
            name=f"{o.name}-pg" if o.detached else "",
            detached=o.detached,
        )
        num_cpus = bundle["CPU"]
    remote_cls = ray.remote(ShardActor)
    actors = []
    try:
        for i, strategy in enumerate(strategies):
            opts: dict[str, Any] = {
                "num_cpus": num_cpus, "max_restarts": 0, "max_concurrency": 1
            }  # fmt: skip
            if gpu:
                opts["num_gpus"] = o.devices_per_shard
            if strategy is not None:
                opts["scheduling_strategy"] = strategy
            if o.detached:
                opts.update(name=name_of(i), namespace=o.namespace, lifetime="detached")
            actors.append(_create(remote_cls, opts, i, num_shards, o))
        t0 = time.perf_counter()
        address = ray.get(actors[0].node_address.remote(), timeout=max(o.timeout_s, 120))
        heartbeat = max(10, int(o.timeout_s * 2))
        keys = new_keys(num_shards)  # each shard its own channel secret
        refs = [
            a.start.remote(address, spec, mesh_axes, row_axis, heartbeat, key)
            for a, spec, key in zip(actors, specs, keys, strict=True)
        ]
        results = per_shard(refs, max(o.timeout_s, 180))
        for i, res in enumerate(results):
            if isinstance(res, BaseException):
                raise ShardFailedError(i, -1, f"start failed: {type(res).__name__}: {res}")
    except BaseException:
        kill(actors)
        release(pg)
        raise
    seconds = time.perf_counter() - t0
    log.info("started %d shard actors in %.1fs", num_shards, seconds)
    return ShardSet(actors, results, keys, pg)


def _create(remote_cls, opts: dict, shard: int, num_shards: int, o: RayOptions):
    """Create one actor; a detached name still held by a just-killed actor is retried."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return remote_cls.options(**opts).remote(
                shard, num_shards, o.devices_per_shard, o.platform
            )
        except ValueError as exc:
            if "name" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
