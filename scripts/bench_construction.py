"""What building a page table costs, the way a serving engine builds them (issue 20).

EasyDeL's eSurge builds about 16 page tables per engine, most used on the host only, and
closes none. This measures, per table (median of 16, built in turn):

a. ``MultiGroupPageTable`` with eSurge's call (keywords, a replicated ``NamedSharding``),
   ``ShardedPageTable`` with the same call (one in-process shard by default), with 4
   in-process shards, and with 4 Ray shard processes: each built, then used on the host
   (row ops, host reads, ``clear``), never committed; and the device arrays alive after.
b. One Ray table of ``configs/ray-local.yaml`` (4 survivable shard processes x 1 device):
   its construction, ``start()`` (what an eager table paid in its constructor), and the
   first commit after it.
c. 16 Ray tables built, 2 of them committed, all dropped without ``close()``: shard
   processes left running.

    scripts/dev.sh bench bench_construction           # a and, with Ray, b and c
    scripts/dev.sh bench bench_construction --quick   # a without Ray
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sharded_pagetable as sp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"max_num_reqs": 256, "max_model_len": 8192, "max_num_batched_tokens": 2048}
PAGE_SIZES = [16, 64]
TABLES = 16


def use_on_host(table) -> None:
    table.add_row([[1, 2], [3]], 5)
    table.move_row(5, 9)
    table[0].get_cpu_tensor()
    table.clear()


def per_table(make: Callable[[], object]) -> tuple[float, int]:
    """Median ms to build and use one table on the host, over ``TABLES`` built in turn (all
    kept alive), and the device arrays they hold."""
    before = len(jax.live_arrays())
    times, tables = [], []
    for _ in range(TABLES):
        t0 = time.perf_counter()
        table = make()
        use_on_host(table)
        times.append(time.perf_counter() - t0)
        tables.append(table)
    arrays = len(jax.live_arrays()) - before
    del tables
    gc.collect()
    return 1e3 * statistics.median(times), arrays


def section_a(with_ray: bool) -> None:
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("dp",)), P())  # eSurge's
    call = {**SHAPE, "page_sizes": PAGE_SIZES, "sharding": sharding}
    makers = {
        "MultiGroupPageTable": lambda: sp.MultiGroupPageTable(**call),
        "ShardedPageTable, default (1 local shard)": lambda: sp.ShardedPageTable(**call),
        "ShardedPageTable, 4 local shards": lambda: sp.ShardedPageTable(**call, num_shards=4),
    }
    if with_ray:
        makers["ShardedPageTable, 4 Ray shards"] = lambda: sp.ShardedPageTable(
            **call, num_shards=4, backend="ray", ray={"devices_per_shard": 1}
        )
    for make in makers.values():  # warm imports and compiles once
        use_on_host(make())
    print(f"a. {TABLES} tables each, built and used on the host only (never committed)")
    print(f"   {'table':<44} {'ms per table (p50)':>18} {'device arrays':>14}")
    for name, make in makers.items():
        ms, arrays = per_table(make)
        print(f"   {name:<44} {ms:>18.2f} {arrays:>14}")


def section_b() -> None:
    config = str(ROOT / "configs" / "ray-local.yaml")
    t0 = time.perf_counter()
    table = sp.ShardedPageTable.from_config(config)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    table.start()
    started = time.perf_counter() - t0
    table.add_row([[1], [2]], 0)
    t0 = time.perf_counter()
    table.commit(1)
    first = time.perf_counter() - t0
    table.close()
    print("b. a table of configs/ray-local.yaml (4 survivable shard processes x 1 device)")
    print(f"   construction {1e3 * built:.1f} ms; start() {started:.1f} s (an eager table paid")
    print(f"   this in its constructor); first commit after it {1e3 * first:.1f} ms")


def section_c() -> None:
    from sharded_pagetable.testing.chaos import wait_for_exit

    tables = [
        sp.ShardedPageTable(8, 256, 64, PAGE_SIZES, backend="ray", ray={"devices_per_shard": 1})
        for _ in range(TABLES)
    ]
    for t in tables[:2]:
        t.add_row([[1], [2]], 0)
        t.commit(8)
    pids = [where["pid"] for t in tables[:2] for where in t._backend.placements]
    del tables, t
    gc.collect()
    left = [pid for pid in pids if not wait_for_exit(pid, 30)]
    print(f"c. {TABLES} Ray tables built, 2 committed ({len(pids)} shard processes), all dropped")
    print(f"   without close(): {len(left)} shard processes left running")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="section a without Ray")
    args = parser.parse_args()
    section_a(with_ray=not args.quick)
    if args.quick:
        return
    import ray

    from ray_actors.cluster import start_local

    start_local(namespace="bench_construction")
    try:
        section_b()
        section_c()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
