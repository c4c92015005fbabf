"""Connecting to Ray and placing shard actors."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping

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


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), to tell it from
    a later process that reuses the pid; None where ``/proc`` cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22, after the comm field


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` (on this machine) is gone; False if it outlived
    ``timeout_s``. A kill, SIGKILL or ``ray.kill``, is asynchronous."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.005)
    return False


def reap(placements: list[dict], grace_s: float = 1.0, timeout_s: float = 10.0) -> list[int]:
    """Make sure the shard processes of ``placements`` that run on this node are gone: wait
    ``grace_s`` for them to exit after Ray was told to kill them, then SIGKILL the ones that
    are still the processes recorded there (a stopped or hung process ignores Ray's polite
    kill for seconds and keeps its devices), and wait until they are gone. Returns the pids
    that had to be killed."""
    import signal

    node = ray.get_runtime_context().get_node_id()
    mine = [
        (w["pid"], w["start_ticks"])
        for w in placements
        if w.get("node_id") == node and w.get("pid") and w.get("start_ticks") is not None
    ]

    def running(pid: int, ticks: int) -> bool:
        return process_start_ticks(pid) == ticks and not _is_zombie(pid)

    deadline = time.monotonic() + grace_s
    while any(running(*m) for m in mine) and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = []
    for pid, ticks in mine:
        if running(pid, ticks):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    deadline = time.monotonic() + timeout_s
    while any(running(*m) for m in mine) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] == b"Z"


def connect(address: str | None, namespace: str) -> bool:
    """Join the cluster at ``address`` or start a local Ray bound to 127.0.0.1.

    Returns True when this call initialised Ray in this process (so the caller owns the
    ``ray.shutdown``). When Ray is already initialised it is used as it is.
    """
    if ray.is_initialized():
        return False
    if address is None:
        start_local(namespace)
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost"):
        _loopback_only()  # else Ray rewrites the driver's own address to a routable one
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


class SpreadPlacementError(RuntimeError):
    """``placement: spread`` cannot put every shard on a node of its own."""


def _fits(total: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(total.get(key, 0.0) >= amount for key, amount in bundle.items())


def spread_nodes(resources: Mapping[str, float]) -> tuple[int, int]:
    """(alive nodes, alive nodes whose total resources can hold one shard's bundle)."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive), sum(_fits(n.get("Resources", {}), resources) for n in alive)


def spread_strategies(
    num_shards: int,
    resources: Mapping[str, float],
    timeout_s: float,
    *,
    name: str = "",
    detached: bool = False,
):
    """One bundle per shard in a STRICT_SPREAD placement group: every shard actor on a node
    of its own (in production one node is one host).

    Fails fast, before anything is created, when the cluster has fewer nodes that could hold
    a bundle than there are shards: Ray would otherwise keep such a group pending forever.
    A group that still cannot be placed within ``timeout_s`` (the nodes exist but their
    resources are taken) is removed again and reported. ``name`` / ``detached`` name the group
    and let it outlive the driver (for detached shard actors, which would otherwise be killed
    with the group when the driver that created it exits).

    Returns ``(placement_group, [scheduling strategy of shard i])``; raises
    :class:`SpreadPlacementError`.
    """
    bundle = {key: float(amount) for key, amount in resources.items() if amount} or {"CPU": 0.01}
    alive, fit = spread_nodes(bundle)
    if fit < num_shards:
        where = f"{alive} alive node(s)"
        if fit != alive:
            where += f", {fit} of them with the resources of a shard ({bundle})"
        raise SpreadPlacementError(
            f"placement: spread needs one node per shard, and the cluster has fewer nodes than "
            f"shards: {num_shards} shards, {where}. Add nodes, lower num_shards, or use "
            f"placement: pack"
        )
    pg = placement_group(
        [dict(bundle) for _ in range(num_shards)],
        strategy="STRICT_SPREAD",
        name=name,
        lifetime="detached" if detached else None,
    )
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    except BaseException:
        release(pg)
        raise
    if not ready:
        release(pg)
        raise SpreadPlacementError(
            f"placement: spread could not place {num_shards} shards on distinct nodes within "
            f"{timeout_s:.0f}s ({fit} nodes could hold a shard's resources {bundle}, but not "
            f"all of them have them free)"
        )
    return pg, bundle_strategies(pg, num_shards)


def bundle_strategies(pg, num_shards: int) -> list[PlacementGroupSchedulingStrategy]:
    """Shard ``i``'s scheduling strategy: bundle ``i`` of ``pg``."""
    return [
        PlacementGroupSchedulingStrategy(
            placement_group=pg,
            placement_group_bundle_index=i,
            placement_group_capture_child_tasks=False,
        )
        for i in range(num_shards)
    ]


def release(pg) -> None:
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception as exc:  # the cluster may already be gone
            log.debug("placement group removal failed: %s", exc)
