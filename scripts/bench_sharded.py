"""Per-step commit cost of the sharded table on a decode-like workload, all backends in one run.

Each step every live row gets a new page with probability 1/page_size per group, and a few
requests finish and start (clear_row + add_row), condense (move_row) and reorder (swap_row),
some across shards. The same seeded steps are replayed on every table; only ``commit`` is
timed (with the device work finished), and the bytes each commit sent are reported.

    scripts/dev.sh bench bench_sharded            # full run
    scripts/dev.sh bench bench_sharded --quick    # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import sharded_pagetable as sp  # noqa: E402
from sharded_pagetable.routing.mesh import build_mesh, row_sharding  # noqa: E402
from sharded_pagetable.testing.baseline import SeedStyleMultiGroupPageTable  # noqa: E402

ROWS, MAX_LEN, PAGE_SIZES, BUDGET = 1024, 32768, (16, 64), 8192


def make_steps(seed: int, steps: int, rows: int, rows_per_shard: int):
    """Initial row contents and ``steps`` lists of row ops (identical for every table)."""
    rng = np.random.default_rng(seed)
    next_page = [0, 0]

    def pages(g: int, n: int) -> list[int]:
        start = next_page[g]
        next_page[g] += n
        return list(range(start, start + n))

    def new_request() -> list[list[int]]:
        tokens = int(rng.integers(256, 8192))
        return [pages(g, sp.cdiv(tokens, s)) for g, s in enumerate(PAGE_SIZES)]

    init = [("add_row", (new_request(), r)) for r in range(rows)]
    plan = []
    for _ in range(steps):
        ops = []
        grow = [rng.random(rows) < 1 / s for s in PAGE_SIZES]
        who = np.flatnonzero(grow[0] | grow[1])
        ops.append(
            (
                "append_rows_batch",
                (
                    [[pages(g, int(grow[g][r])) for g in range(2)] for r in who],
                    [int(r) for r in who],
                ),
            )
        )
        for _ in range(2):  # a request finishes, a new one takes its row
            r = int(rng.integers(rows))
            ops += [("clear_row", (r,)), ("add_row", (new_request(), r))]
        for _ in range(2):  # condense: a row moves into a hole, some across shards
            a, b = (int(x) for x in rng.integers(rows, size=2))
            ops += [("move_row", (a, b)), ("add_row", (new_request(), a))]
        for _ in range(2):  # decode-first reorder
            a, b = (int(x) for x in rng.integers(rows, size=2))
            ops.append(("swap_row", (a, b)))
        cross = sum(
            1
            for name, args in ops
            if name in ("move_row", "swap_row")
            and args[0] // rows_per_shard != args[1] // rows_per_shard
        )
        plan.append((ops, cross))
    return init, plan


def ray_table(n: int, rows: int = ROWS, lib=sp):
    """A Ray table of ``rows`` rows over ``n`` shard processes sharing the 8 devices, built
    from ``lib`` (this package, or another version of it: ``bench_ab``)."""
    return lib.ShardedPageTable(
        rows, MAX_LEN, BUDGET, PAGE_SIZES, num_shards=n, backend="ray",
        ray={"devices_per_shard": 8 // n, "timeout_s": 60},
    )  # fmt: skip


def apply(table, ops) -> None:
    for name, args in ops:
        getattr(table, name)(*args)


def wait(table) -> None:
    """Finish asynchronous device work so it is counted in the commit it belongs to."""
    if isinstance(table, sp.ShardedPageTable):
        if table.backend_name == "local":
            for g in range(len(table)):
                table[g].get_device_tensor().block_until_ready()
        return  # ray: the shard's ack is sent after its device update was dispatched
    for g in range(len(table.page_tables)):
        table[g].get_device_tensor().block_until_ready()


def run(name: str, table, init, plan, pipelined: bool = False) -> dict:
    """Time each step's commit. ``pipelined``: ``commit(wait=False)``, so the time is what
    the scheduler waits (it settles the previous epoch, then sends this one); the step's row
    ops run while the epoch is in flight, as an engine builds its next step."""
    apply(table, init)
    table.commit(ROWS)
    wait(table)
    times, sent = [], []
    gc.disable()
    for ops, _ in plan:
        apply(table, ops)
        t0 = time.perf_counter()
        if pipelined:
            receipt = table.commit(ROWS, wait=False)
        else:
            receipt = table.commit(ROWS)
            wait(table)
        times.append(time.perf_counter() - t0)
        sent.append(receipt.bytes if isinstance(receipt, sp.CommitReceipt) else None)
    if pipelined:
        table.wait()
    gc.enable()
    us = np.array(times) * 1e6
    out = {
        "name": name,
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "bytes_p50": float(np.median(sent)) if sent[0] is not None else None,
        "bytes_p99": float(np.percentile(sent, 99)) if sent[0] is not None else None,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="40 steps, no Ray")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    steps = 40 if args.quick else args.steps
    with_ray = not (args.quick or args.no_ray)
    sharding = row_sharding(build_mesh(None, "data"), "data")

    tables = [
        (
            "seed-style MultiGroupPageTable (1 device)",
            lambda: SeedStyleMultiGroupPageTable(ROWS, MAX_LEN, BUDGET, list(PAGE_SIZES)),
        ),
        (
            "MultiGroupPageTable (1 device)",
            lambda: sp.MultiGroupPageTable(ROWS, MAX_LEN, BUDGET, PAGE_SIZES),
        ),
        (
            "MultiGroupPageTable (8 devices)",
            lambda: sp.MultiGroupPageTable(ROWS, MAX_LEN, BUDGET, PAGE_SIZES, sharding=sharding),
        ),
    ]
    for n in (1, 2, 4):
        tables.append(
            (
                f"Sharded local, {n} shard(s), 8 devices",
                lambda n=n: sp.ShardedPageTable(ROWS, MAX_LEN, BUDGET, PAGE_SIZES, num_shards=n),
            )
        )
    tables.append(
        (
            "Sharded local, 4 shard(s), 8 devices, wait=False",
            lambda: sp.ShardedPageTable(ROWS, MAX_LEN, BUDGET, PAGE_SIZES, num_shards=4),
        )
    )

    if with_ray:
        for n in (2, 4):
            tables.append(
                (f"Sharded ray, {n} processes x {8 // n} devices", lambda n=n: ray_table(n))
            )
        tables.append(("Sharded ray, 4 processes x 2 devices, wait=False", lambda: ray_table(4)))
    init, plan = make_steps(0, steps, ROWS, ROWS // 4)
    dirty = []
    probe = sp.MultiGroupPageTable(ROWS, MAX_LEN, BUDGET, PAGE_SIZES, warmup=False)
    apply(probe, init)
    probe.commit(ROWS)
    for ops, _ in plan:
        apply(probe, ops)
        dirty.append(probe.commit(ROWS))
    print(
        f"table {ROWS} rows, page sizes {PAGE_SIZES}, max_model_len {MAX_LEN} "
        f"(pages per row {[sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES]}); {steps} steps"
    )
    print(
        f"dirty row-groups per step: median {np.median(dirty):.0f}, max {max(dirty)}; "
        f"cross-shard move/swap per step (4 shards): "
        f"{np.mean([c for _, c in plan]):.1f}"
    )
    results = []
    for name, factory in tables:
        table = factory()
        try:
            results.append(run(name, table, init, plan, pipelined=name.endswith("wait=False")))
        finally:
            if hasattr(table, "close"):
                table.close()
    base = next(r for r in results if r["name"].startswith("MultiGroupPageTable (8"))
    print()
    print(
        f"{'table':<50} {'p50 us':>9} {'p99 us':>9} {'vs MGPT-8':>9} {'bytes p50':>10} {'bytes p99':>10}"
    )
    for r in results:
        b50 = "-" if r["bytes_p50"] is None else f"{r['bytes_p50']:.0f}"
        b99 = "-" if r["bytes_p99"] is None else f"{r['bytes_p99']:.0f}"
        print(
            f"{r['name']:<50} {r['p50_us']:>9.0f} {r['p99_us']:>9.0f} "
            f"{r['p50_us'] / base['p50_us']:>8.2f}x {b50:>10} {b99:>10}"
        )
    print()
    local = [
        r for r in results if r["name"].startswith("Sharded local") and "wait" not in r["name"]
    ]
    worst_local = max(r["p50_us"] for r in local)
    print(
        f"target local commit within 2x of the single-process table (8 devices): "
        f"{worst_local / base['p50_us']:.2f}x -> {'PASS' if worst_local <= 2 * base['p50_us'] else 'MISS'}"
    )
    by = {r["name"]: r for r in results}
    mg1 = by["MultiGroupPageTable (1 device)"]["p50_us"]

    def target(text: str, value: float, limit: float, unit: str = "x") -> None:
        print(f"target {text}: {value:.2f}{unit} (limit {limit}{unit}) -> "
              f"{'PASS' if value <= limit else 'MISS'}")  # fmt: skip

    target("MultiGroupPageTable 8 devices vs 1 device, p50", base["p50_us"] / mg1, 1.5)
    local4 = by["Sharded local, 4 shard(s), 8 devices"]["p50_us"]
    target(
        "local 4 shards x 8 devices vs MultiGroupPageTable 8 devices", local4 / base["p50_us"], 1.3
    )
    piped = by["Sharded local, 4 shard(s), 8 devices, wait=False"]["p50_us"]
    target("local 4 shards commit(wait=False) vs MultiGroupPageTable 1 device", piped / mg1, 1.5)
    ray4 = by.get("Sharded ray, 4 processes x 2 devices")
    if ray4:
        target("ray 4 processes blocking commit p50", ray4["p50_us"] / 1000, 1.3, " ms")
        target("ray 4 processes blocking commit p99", ray4["p99_us"] / 1000, 3.0, " ms")
        wait4 = by["Sharded ray, 4 processes x 2 devices, wait=False"]["p50_us"]
        target(
            "ray 4 processes commit(wait=False) vs MultiGroupPageTable 1 device", wait4 / mg1, 1.5
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
