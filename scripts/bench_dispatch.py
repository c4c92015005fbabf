"""One device dispatch per process vs one per device, for a commit's cell updates.

Today a commit updates each touched device with its own donated, jitted in-place cell loop
(every group of a device in one call). The alternative is one SPMD program over all of this
process's devices (``shard_map`` of the same loop), a single dispatch per commit. Both are
timed here side by side, interleaved, on 8 CPU devices, for two table sizes; the library
keeps whichever is faster (see the README for the figures).

    scripts/dev.sh bench bench_dispatch [--reps N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from sharded_pagetable.rows.device import _put_cells_groups, _put_cells_loop  # noqa: E402


def fused_program(mesh: Mesh, groups: int):
    def body(bufs, rcv, ks):  # bufs: per group [rows/devices, P]; rcv [1, G, 3, K]; ks [1, G]
        return tuple(_put_cells_loop(b, rcv[0, g], ks[0, g]) for g, b in enumerate(bufs))

    rows = P("data", None)
    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=((rows,) * groups, P("data"), P("data")),
        out_specs=(rows,) * groups,
    )
    return jax.jit(mapped, donate_argnums=0)


def run(rows: int, widths: tuple[int, ...], cells: int, reps: int) -> dict[str, float]:
    mesh = Mesh(np.array(jax.devices()), ("data",))
    devices = len(jax.devices())
    groups = len(widths)
    sharding = NamedSharding(mesh, P("data", None))
    fused = fused_program(mesh, groups)
    rng = np.random.default_rng(0)
    rcv = np.zeros((devices, groups, 3, 64), np.int32)
    rcv[:, :, 0, :cells] = rng.integers(0, rows // devices, (devices, groups, cells))
    rcv[:, :, 1, :cells] = rng.integers(0, min(widths), (devices, groups, cells))
    rcv[:, :, 2, :cells] = rng.integers(1, 1000, (devices, groups, cells))
    ks = np.full((devices, groups), cells, np.int32)
    flat = NamedSharding(mesh, P("data"))
    separate = tuple(jax.device_put(np.zeros((rows, w), np.int32), sharding) for w in widths)
    per = [[s.data for s in a.addressable_shards] for a in separate]
    arrays = tuple(jax.device_put(np.zeros((rows, w), np.int32), sharding) for w in widths)
    per_device = [tuple(per[g][d] for g in range(groups)) for d in range(devices)]
    times: dict[str, list[float]] = {"per-device": [], "fused": []}
    for rep in range(reps + 5):
        t0 = time.perf_counter()
        per_device = [_put_cells_groups(bufs, rcv[d], ks[d]) for d, bufs in enumerate(per_device)]
        jax.block_until_ready(per_device)
        t1 = time.perf_counter()
        arrays = fused(arrays, jax.device_put(rcv, flat), jax.device_put(ks, flat))
        jax.block_until_ready(arrays)
        t2 = time.perf_counter()
        if rep >= 5:
            times["per-device"].append(t1 - t0)
            times["fused"].append(t2 - t1)
    return {k: float(np.median(v)) * 1e6 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    print(f"{len(jax.devices())} CPU devices; medians of {args.reps} interleaved commits (us)")
    print(f"{'table':<24}{'cells/device':>13}{'per-device':>12}{'fused':>10}{'fused/per':>11}")
    for rows, widths in ((1024, (512, 256)), (4096, (2048, 512))):
        for cells in (1, 12, 64):
            r = run(rows, widths, cells, args.reps)
            name = f"{rows} x {widths}"
            ratio = r["fused"] / r["per-device"]
            print(f"{name:<24}{cells:>13}{r['per-device']:>12.0f}{r['fused']:>10.0f}{ratio:>11.2f}")
    print("the machine is shared and noisy: compare the ratios, not single figures")


if __name__ == "__main__":
    main()
