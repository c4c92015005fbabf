"""``placement: spread`` on a multi-node Ray cluster, and the cluster configs.

The Ray tests fake three nodes on this machine with ``ray.cluster_utils.Cluster`` (each a
raylet of its own, all bound to 127.0.0.1): a 3-shard spread table must put one shard
process on each node and agree with the single-process table; a 4-shard spread table on
three nodes must fail at once, saying why, and leave nothing behind. The config tests only
parse YAML and need no Ray.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from differential import random_ops, run_differential

import sharded_pagetable as sp

ROOT = Path(__file__).resolve().parent.parent
ROWS, MAX_LEN, PAGE_SIZES = 48, 256, (16, 64)  # 48 rows divide over 6 and over 8 devices
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)
NUM_NODES = 3


@pytest.fixture(scope="module")
def cluster(no_shared_ray):
    """Three fake nodes on 127.0.0.1 with this process connected as the driver."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from ray_actors.cluster import _loopback_only

    assert not ray.is_initialized(), "another test left Ray running"
    _loopback_only()
    # A private temp dir: Cluster records its address in <temp>/ray_current_cluster, where a
    # plain ray.init() elsewhere on this machine would otherwise find and join it.
    temp = tempfile.mkdtemp(prefix="spt-pl-", dir="/tmp")  # short: Unix sockets live in it
    os.makedirs(os.path.join(temp, "ray"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", temp)
        node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "temp_dir": temp}
        c = Cluster()
        try:
            c.add_node(**node, include_dashboard=False, resources={"node_0": 1})
            for i in range(1, NUM_NODES):
                c.add_node(**node, resources={f"node_{i}": 1})
            c.wait_for_nodes()
            ray.init(
                address=c.address,
                namespace="sharded_pagetable_placement",
                log_to_driver=False,
                configure_logging=False,
            )
            yield c
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    assert not ray.is_initialized()


def _alive_actors(settle_s: float = 0.0) -> set[str]:
    """Actors not DEAD; with ``settle_s``, waits that long for killed ones to be reported."""
    from ray._private.state import actors

    deadline = time.monotonic() + settle_s
    while True:
        alive = {a for a, info in actors().items() if info["State"] != "DEAD"}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def _live_groups() -> set[str]:
    from ray.util import placement_group_table

    return {g for g, info in placement_group_table().items() if info["state"] != "REMOVED"}


def _table(num_shards: int) -> sp.ShardedPageTable:
    return sp.ShardedPageTable(
        ROWS,
        MAX_LEN,
        128,
        PAGE_SIZES,
        num_shards=num_shards,
        backend="ray",
        # address None: Ray is already initialised (connected to the cluster) and is used as is
        ray={"placement": "spread", "devices_per_shard": 2, "address": None, "timeout_s": 60},
    )


@pytest.mark.ray
@pytest.mark.multiprocess
def test_cluster_has_three_loopback_nodes(cluster):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == NUM_NODES
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}


@pytest.mark.ray
@pytest.mark.multiprocess
def test_spread_puts_one_shard_per_node_and_agrees(cluster):
    import ray

    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    with _table(NUM_NODES) as table:
        placements = table._backend.placements
        assert len(placements) == NUM_NODES
        shard_nodes = [p["node_id"] for p in placements]
        assert len(set(shard_nodes)) == NUM_NODES, f"two shards share a node: {shard_nodes}"
        assert set(shard_nodes) == node_ids
        assert len({p["pid"] for p in placements}) == NUM_NODES
        assert all(p["node_ip"] == "127.0.0.1" for p in placements)

        reference = sp.MultiGroupPageTable(ROWS, MAX_LEN, 128, PAGE_SIZES, warmup=False)
        ops = random_ops(7, ROWS, WIDTHS, 150)
        commits = run_differential(table, reference, ops, lambda t, g: t.device_snapshot(g))
        assert commits > 5
    assert not _alive_actors(settle_s=10), "closing the table left shard actors behind"


@pytest.mark.ray
@pytest.mark.multiprocess
def test_spread_with_fewer_nodes_than_shards_fails_fast(cluster):
    actors, groups = _alive_actors(), _live_groups()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="fewer nodes than shards") as info:
        _table(NUM_NODES + 1).start()  # a table starts its shards when first needed
    elapsed = time.monotonic() - t0
    assert "4 shards" in str(info.value) and f"{NUM_NODES} alive node(s)" in str(info.value)
    assert elapsed < 20, f"took {elapsed:.1f}s: it should not wait for the placement group"
    assert _alive_actors() == actors, "a failed spread left shard actors behind"
    assert _live_groups() == groups, "a failed spread left a placement group behind"


# -- cluster configs (plain YAML, no Ray) ----------------------------------------------------


def _load(name: str):
    with open(ROOT / "configs" / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_ray_up_config():
    c = _load("cluster.yaml")
    assert c["cluster_name"]
    assert c["provider"]["type"]
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    workers = [t for name, t in types.items() if name != c["head_node_type"]]
    assert workers and all(t["min_workers"] >= 1 for t in workers)
    assert any("pip install" in cmd for cmd in c["setup_commands"])
    head_start = " ".join(c["head_start_ray_commands"])
    worker_start = " ".join(c["worker_start_ray_commands"])
    assert "start_head.sh" in head_start and "start_worker.sh" in worker_start
    assert "$RAY_HEAD_IP" in worker_start  # workers join the head the launcher started
    for cmd in (head_start, worker_start):
        assert "RAY_AUTH_MODE=disabled" not in cmd
    # The cluster token reaches every node through file_mounts.
    assert any("auth_token" in str(dst) for dst in c["file_mounts"])


def test_kuberay_config():
    docs = [d for d in yaml.safe_load_all((ROOT / "configs" / "kuberay.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    rc = kinds["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    groups = spec["workerGroupSpecs"]
    assert groups and groups[0]["replicas"] >= 1
    for pod in [head["template"], *(g["template"] for g in groups)]:
        container = pod["spec"]["containers"][0]
        assert container["image"]
        assert container["resources"]["limits"]["cpu"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
    # the secret the pods read their token from is part of the sample
    assert kinds["Secret"]["stringData"]["auth_token"]


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "ray-cluster-local.yaml"])
def test_table_configs_for_clusters(name):
    config = sp.TableConfig.from_yaml(str(ROOT / "configs" / name))
    assert config.backend == "ray" and config.ray.placement == "spread"
    assert config.ray.address == "auto"
    devices = config.num_shards * config.ray.devices_per_shard
    assert dict(config.mesh) == {config.row_axis: devices}
    assert config.max_num_reqs % devices == 0


def test_scripts_are_executable():
    for name in ("start_head.sh", "start_worker.sh", "stop.sh", "launch_local_cluster.sh"):
        assert os.access(ROOT / "scripts" / name, os.X_OK), name


def test_a_replacement_takes_the_spare_on_its_own_node_first():
    """Warm spares, one per node that runs a shard: a dead shard's replacement is the spare
    on its node, else another node's (its node may have died with it), else a new process;
    the nodes left without one are where the next spares start."""
    pytest.importorskip("ray")
    from ray_actors.launch import ShardSet, missing_spares, take_spare

    shards = ShardSet(
        actors=[None] * 3,
        placements=[{"node_id": "n1"}, {"node_id": "n2"}, {"node_id": "n1"}],
        keys=[],
        actor_options=[{}] * 3,
        spares={"n1": "spare-1", "n2": "spare-2"},
    )
    assert missing_spares(shards) == []
    assert take_spare(shards.spares, "n2") == ("n2", "spare-2")
    assert missing_spares(shards) == ["n2"]
    assert take_spare(shards.spares, "n2") == ("n1", "spare-1")  # none left on n2
    assert take_spare(shards.spares, "n1") is None
    assert missing_spares(shards) == ["n1", "n2"]
