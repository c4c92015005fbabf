"""Starting a set of shard actors: one JAX distributed job, placed, joined and warmed."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sharded_pagetable.config import RayOptions
from sharded_pagetable.errors import ShardFailedError
from sharded_pagetable.shard.shard import ShardSpec

from .calls import per_shard
from .channel import new_keys, new_secret
from .cluster import bundle_strategies, release, spread_strategies
from .shard_actor import JaxService, JobSeat, ShardActor

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ShardSet:
    """One started set of shard actors (one JAX distributed job).

    ``job`` says where they sit in it; ``service`` is the actor hosting JAX's coordination
    service when the job is survivable (None: shard 0 hosts it); ``actor_options`` are what
    a replacement of each shard is created with; ``spares`` the warm spares that are ready,
    one per node the shards run on (by Ray node id);
    ``kv_secret`` the secret of the shards' KV channel (survivable jobs: model steps move
    KV pages over it instead of a collective).
    """

    actors: list[Any]
    placements: list[dict[str, Any]]
    keys: list
    pg: Any = None
    job: JobSeat | None = None
    service: Any = None
    actor_options: list[dict[str, Any]] = field(default_factory=list)
    # started, warmed shard actors in no job yet (survivable), by the node they run on
    spares: dict[str, Any] = field(default_factory=dict)
    kv_secret: bytes | None = None


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


def _actor_options(
    options: RayOptions, num_cpus: float, strategies: list[Any], name_of: Callable[[int], str]
) -> list[dict[str, Any]]:
    """Ray options of each shard actor: resources, placement, and a name when detached."""
    out = []
    for i, strategy in enumerate(strategies):
        opts: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": 0, "max_concurrency": 1}
        if options.platform == "gpu":
            opts["num_gpus"] = options.devices_per_shard
        if strategy is not None:
            opts["scheduling_strategy"] = strategy
        if options.detached:
            opts.update(name=name_of(i), namespace=options.namespace, lifetime="detached")
        out.append(opts)
    return out


def _bundle(o: RayOptions) -> dict[str, float]:
    """One shard's resources in a ``placement: spread`` group."""
    bundle: dict[str, float] = {"CPU": o.cpus_per_shard or 0.01}
    if o.platform == "gpu":
        bundle["GPU"] = o.devices_per_shard
    return bundle


def service_name(options: RayOptions) -> str:
    """The name of a detached survivable table's JAX service actor."""
    return f"{options.name}-jax-service"


def _renamed(opts: dict[str, Any], options: RayOptions, what: str) -> dict[str, Any]:
    """``opts`` with a name of its own (a detached survivable table's replacement or spare:
    a dead actor's name is not free at once, and the service's roster finds it anyway)."""
    if "name" not in opts:
        return opts
    return {**opts, "name": f"{options.name}-{what}-{secrets.token_hex(4)}"}


def _enlist(
    shards: ShardSet, shard: int | None, opts: dict[str, Any], node: str | None = None
) -> None:
    """Record a named actor in the service's roster (detached survivable tables): as shard
    ``shard``'s, or (``shard`` None) as the spare on ``node`` (``opts`` without a name: that
    node has none now)."""
    if _named(shards) and ("name" in opts or node is not None):
        ray.get(shards.service.enlist.remote(shard, opts.get("name"), node), timeout=30)


def _named(shards: ShardSet) -> bool:
    """A detached survivable table: named actors, listed in the service's roster."""
    return shards.service is not None and "name" in shards.actor_options[0]


def find_service(options: RayOptions) -> tuple[Any, dict[str, Any]]:
    """A detached survivable table's running service actor and its roster of actor names."""
    try:
        service = ray.get_actor(service_name(options), namespace=options.namespace)
        roster = ray.get(service.roster.remote(), timeout=max(options.timeout_s, 10))
    except Exception as exc:
        raise ShardFailedError(
            -1, -1, f"no running JAX service actor named {service_name(options)!r}: {exc}"
        ) from None
    return service, roster


def attached_set(
    actors: list[Any],
    placements: list[dict[str, Any]],
    keys: list,
    pg: Any,
    options: RayOptions,
    name_of: Callable[[int], str],
    service: Any,
    spare_names: dict[str, str],
) -> ShardSet:
    """The :class:`ShardSet` of a running survivable table found by name (attach): its
    service actor, its job seat and KV secret (asked of a shard), the options a replacement
    of each shard is created with, and its warm spares that are still there; raises
    :class:`ShardFailedError` if no shard can say where it sits."""
    seats = per_shard([a.seat.remote() for a in actors], options.timeout_s)
    seat = next((s for s in seats if s is not None and not isinstance(s, BaseException)), None)
    if seat is None:
        raise ShardFailedError(-1, -1, "no shard of the table could say where it sits in its job")
    job, kv_secret = seat
    strategies: list[Any] = [None] * len(actors)
    num_cpus = options.cpus_per_shard
    if pg is not None:
        strategies = bundle_strategies(pg, len(actors))
        num_cpus = _bundle(options)["CPU"]
    actor_options = _actor_options(options, num_cpus, strategies, name_of)
    shards = ShardSet(
        actors, placements, keys, pg, job, service, actor_options, kv_secret=kv_secret
    )
    for node, name in spare_names.items():
        try:
            spare = ray.get_actor(name, namespace=options.namespace)
            ray.get(spare.pid.remote(), timeout=10)
            shards.spares[node] = spare
        except Exception as exc:  # gone: the backend starts another
            log.info("the warm spare %s is gone: %s", name, exc)
    return shards


def launch(
    specs: Sequence[ShardSpec],
    mesh_axes: dict[str, int],
    row_axis: str,
    options: RayOptions,
    name_of: Callable[[int], str],
) -> ShardSet:
    """Start one set of shard actors: a JAX distributed job of its own, warmed up (with
    ``options.survivable``, plus the process hosting the job's coordination service)."""
    o = options
    num_shards = len(specs)
    strategies: list[Any] = [None] * num_shards
    num_cpus = o.cpus_per_shard
    pg = None
    if o.placement == "spread":
        bundle = _bundle(o)
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
    actor_options = _actor_options(o, num_cpus, strategies, name_of)
    if o.survivable:  # names of their own, kept in the service's roster
        actor_options = [_renamed(opts, o, f"shard-{i}") for i, opts in enumerate(actor_options)]
    actors, service = [], None
    try:
        actors = [_create(opts, i, num_shards, o) for i, opts in enumerate(actor_options)]
        t0 = time.perf_counter()
        host = actors[0]
        if o.survivable:
            opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
            if o.detached:
                opts.update(name=service_name(o), namespace=o.namespace, lifetime="detached")
            service = ray.remote(JaxService).options(**opts).remote(o.platform)
            host = service
        address = ray.get(host.node_address.remote(), timeout=max(o.timeout_s, 120))
        job = JobSeat(address, num_shards, max(10, int(o.timeout_s * 2)), o.survivable)
        keys = new_keys(num_shards)  # each shard its own channel secret
        kv_secret = new_secret() if o.survivable else None
        refs = [
            a.start.remote(job, spec, mesh_axes, row_axis, key, kv_secret)
            for a, spec, key in zip(actors, specs, keys, strict=True)
        ]
        if service is not None:
            refs.append(service.start.remote(job))
        results = per_shard(refs, max(o.timeout_s, 180))
        for i, res in enumerate(results):
            if isinstance(res, BaseException):
                raise ShardFailedError(i, -1, f"start failed: {type(res).__name__}: {res}")
    except BaseException:
        kill([*actors, *([service] if service is not None else [])])
        release(pg)
        raise
    log.info("started %d shard actors in %.1fs", num_shards, time.perf_counter() - t0)
    shards = ShardSet(
        actors, results[:num_shards], keys, pg, job, service, actor_options, kv_secret=kv_secret
    )
    for i, opts in enumerate(actor_options):
        _enlist(shards, i, opts)
    if o.survivable:
        for node in missing_spares(shards):
            spare = start_spare(shards, o, node)
            if spare is not None:
                shards.spares[node] = spare
    return shards


def missing_spares(shards: ShardSet) -> list[str]:
    """Nodes that run a shard of ``shards`` and have no warm spare (sorted)."""
    nodes = {where.get("node_id") for where in shards.placements} - {None}
    return sorted(nodes - set(shards.spares))


def take_spare(spares: dict[str, Any], node: str | None) -> tuple[str, Any] | None:
    """``(its node, spare)`` to replace a shard that ran on ``node``: the spare on that
    node, else the one on the first other node (a node may have died with its shard), else
    None; removed from ``spares``."""
    if not spares:
        return None
    pick = node if node in spares else sorted(spares)[0]
    return pick, spares.pop(pick)


def start_spare(shards: ShardSet, options: RayOptions, node: str) -> Any:
    """A warm spare for ``shards`` on ``node``: a shard actor started and warmed (JAX and
    the kernels loaded) that joins the job only when it replaces a dead shard; None if it
    cannot start. Placed on the node (softly: elsewhere if the node cannot take it) and
    outside any placement-group bundle."""
    opts = {k: v for k, v in shards.actor_options[0].items() if k != "scheduling_strategy"}
    opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
    opts = _renamed(opts, options, "spare")
    try:
        spare = _create(opts, -1, len(shards.actors), options)
        ray.get(spare.warm.remote(), timeout=max(options.timeout_s, 120))
        _enlist(shards, None, opts, node)  # a coordinator that attaches adopts it
    except Exception as exc:  # a recovery then starts a process itself
        log.warning("could not start a warm spare shard on node %s: %s", node, exc)
        return None
    return spare


def replace_shard(
    shards: ShardSet, shard: int, spec: ShardSpec, mesh_axes: dict[str, int], row_axis: str,
    options: RayOptions,
) -> None:  # fmt: skip
    """Start a new process for ``shard`` of a survivable set (its old one is gone): a warm
    spare when there is one (:func:`take_spare`), else a new actor; it joins the running job
    under the same process id, with a new channel secret."""
    taken = take_spare(shards.spares, shards.placements[shard].get("node_id"))
    if taken is not None:
        spare_node, actor = taken
        _enlist(shards, None, {}, spare_node)  # no longer that node's spare
        name = ray.get(actor.name.remote(), timeout=30) if _named(shards) else None
    else:
        opts = _renamed(shards.actor_options[shard], options, f"shard-{shard}")
        name = opts.get("name")
        actor = _create(opts, shard, len(shards.actors), options)
    key = new_keys(1, table_id=shards.keys[0].table_id)[0]
    try:
        where = ray.get(
            actor.start.remote(shards.job, spec, mesh_axes, row_axis, key, shards.kv_secret),
            timeout=max(options.timeout_s, 180),
        )
    except BaseException as exc:
        kill([actor])
        raise ShardFailedError(
            shard, -1, f"replacement failed: {type(exc).__name__}: {exc}"
        ) from exc
    shards.actors[shard], shards.placements[shard], shards.keys[shard] = actor, where, key
    if name is not None:
        _enlist(shards, shard, {"name": name})


def _create(opts: dict, shard: int, num_shards: int, o: RayOptions):
    """Create one actor; a detached name still held by a just-killed actor is retried."""
    remote_cls = ray.remote(ShardActor)
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
