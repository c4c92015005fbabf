"""Connecting to Ray and placing shard actors."""

from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)


def start_local(namespace: str | None = None, num_cpus: int | None = None) -> None:
    """Start a Ray instance on this machine with every service bound to 127.0.0.1."""
    _loopback_only()
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        namespace=namespace,
        num_cpus=num_cpus,
        log_to_driver=False,
        configure_logging=False,
    )


def connect(address: str | None, namespace: str) -> bool:
    """Join the cluster at ``address`` or start a local Ray bound to 127.0.0.1.

    Returns True when this call started Ray (so the caller owns its shutdown). When Ray is
    already initialised in this process it is used as it is.
    """
    if ray.is_initialized():
        return False
    if address is None:
        start_local(namespace)
    else:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    return True


def _loopback_only() -> None:
    """Make a locally started Ray bind every service to 127.0.0.1.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is rewritten to the host's routable
    address; Ray keeps services on loopback only when it believes clustering is off, which
    it reads from this environment variable (inherited by the processes it spawns) and from
    a constant already loaded in this process.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def spread_strategies(num_shards: int, resources: dict, timeout_s: float):
    """One STRICT_SPREAD bundle per shard; raises if the cluster has too few nodes."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < num_shards:
        raise RuntimeError(
            f"placement: spread needs one node per shard: {num_shards} shards but the "
            f"cluster has {len(nodes)} alive node(s); add nodes or use placement: pack"
        )
    pg = placement_group([dict(resources) for _ in range(num_shards)], strategy="STRICT_SPREAD")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(
            f"placement: spread could not place {num_shards} shards on distinct nodes within "
            f"{timeout_s:.0f}s (resources per shard: {resources})"
        )
    strategies = [
        PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
        for i in range(num_shards)
    ]
    return pg, strategies


def release(pg) -> None:
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception as exc:  # the cluster may already be gone
            log.debug("placement group removal failed: %s", exc)
