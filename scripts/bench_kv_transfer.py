"""KV migration between shard processes: the KV channel (survivable jobs) vs ``ppermute``.

    scripts/dev.sh bench bench_kv_transfer            # 16 and 64 pages of 128 KiB, 20 reps
    scripts/dev.sh bench bench_kv_transfer --quick

Two Ray tables of 4 shard processes x 1 CPU device, KV-local pools, the same KV cache f32
``[pages, 16, 2*8, 128]`` (128 KiB per page) in every shard process: (k) a survivable job,
whose model step moves pages over the shards' authenticated KV channel
(``serving/kv_transfer``), and (p) a plain job, whose model step runs
``apply_kv_copies`` (one SPMD program, ``ppermute`` across the processes). Each rep moves a
row of ``n`` pages from shard 0 to shard 3 (``move_row(..., page_ids=...)``, commit) and
times the copy inside every shard process (read, send, receive, write, until the cache is
ready); the step waits for the slowest process, so the figure is the max over processes.
Baselines in the driver on the same pages: (c) a ``jax.device_put`` of them to another
device, (h) reading them to host and putting them back (what the channel does, minus the
socket). Every copy is checked: destination pages must hold the source pages' values.
Interleaved reps, p50 per row and per page, ratios in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PAGE, KV_HEADS, HEAD_DIM, SHARDS, ROWS = 16, 8, 128, 4, 16


def copy_step(arrays, step, name: str, num_pages: int):
    """In every shard process: the KV copies the step owes, timed; returns (seconds, ok)."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sharded_pagetable.serving import kv_transfer
    from sharded_pagetable.serving.attention import kv_sharding
    from sharded_pagetable.shard.kv_copy import apply_kv_copies

    store = globals().setdefault("_BENCH_KV", {})
    mesh = arrays[0].sharding.mesh
    if name not in store:  # page p holds the value p everywhere
        shape = (num_pages, PAGE, 2 * KV_HEADS, HEAD_DIM)
        fill = jax.jit(
            lambda: jnp.broadcast_to(
                jnp.arange(num_pages, dtype=jnp.float32)[:, None, None, None], shape
            ),
            out_shardings=kv_sharding(mesh),
        )
        store[name] = fill()
    kv = store[name]
    rounds = step.take_kv_copies()
    t0 = time.perf_counter()
    peer = kv_transfer.installed()
    pool = num_pages // SHARDS
    if peer is None:
        for plan in rounds[0]:
            kv = apply_kv_copies(kv, plan)
    else:
        (kv,), torn = kv_transfer.move_kv_pages([kv], rounds, [pool], step.copies_epoch, peer)
        assert not torn[0].size
    kv.block_until_ready()
    seconds = time.perf_counter() - t0
    ok = True
    for plan in rounds[0]:
        for src, dst in plan.T.tolist():
            for sh in kv.addressable_shards:
                lo = sh.index[0].start or 0
                if lo <= dst < lo + sh.data.shape[0]:
                    ok &= bool(np.asarray(sh.data[dst - lo, 0, 0, 0]) == src)
    store[name] = _reset(kv, num_pages)  # page p holds p again for the next rep
    return seconds, ok


def _reset(kv, num_pages):
    import jax
    import jax.numpy as jnp

    fix = jax.jit(
        lambda x: jnp.broadcast_to(
            jnp.arange(num_pages, dtype=x.dtype)[:, None, None, None], x.shape
        ),
        out_shardings=kv.sharding,
        donate_argnums=0,
    )
    return fix(kv)


def make_table(survivable: bool, pool: int):
    import sharded_pagetable as sp

    return sp.ShardedPageTable(
        ROWS,
        4096,
        256,
        [PAGE],
        num_shards=SHARDS,
        pages_per_shard=pool,
        backend="ray",
        warmup=False,
        ray={"devices_per_shard": 1, "timeout_s": 120, "survivable": survivable},
    )


def migrate(table, n: int, pool: int, name: str) -> tuple[float, bool]:
    """A row of ``n`` pages moves shard 0 -> shard 3; the copy timed in every process."""
    src, tgt = 0, 3 * (ROWS // SHARDS)
    table.add_row([list(range(1, n + 1))], src)
    table.commit(ROWS)
    table.move_row(src, tgt, page_ids=[[3 * pool + 1 + i for i in range(n)]])
    table.clear_row(src)
    table.commit(ROWS)
    results = table.run_on_shards(copy_step, name, SHARDS * pool, step=True)
    table.clear_row(tgt)
    table.commit(ROWS)
    return max(s for s, _ in results), all(ok for _, ok in results)


def local_baselines(n: int) -> dict[str, float]:
    """(c) device_put of n pages to another device, (h) device -> host -> device."""
    import jax

    devices = jax.devices()
    pages = jax.device_put(np.ones((n, PAGE, 2 * KV_HEADS, HEAD_DIM), np.float32), devices[0])
    pages.block_until_ready()
    t0 = time.perf_counter()
    jax.device_put(pages, devices[1]).block_until_ready()
    c = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.device_put(np.asarray(pages), devices[1]).block_until_ready()
    h = time.perf_counter() - t0
    return {"c": c, "h": h}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 pages, 5 reps")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    sizes = [8] if args.quick else [16, 64]
    reps = 5 if args.quick else args.reps
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import ray

    from ray_actors.cluster import start_local

    start_local(namespace="bench_kv_transfer")
    pool = 4 * max(sizes) + 8
    tables = {"k": make_table(True, pool), "p": make_table(False, pool)}
    rows = []
    try:
        for n in sizes:
            times: dict[str, list[float]] = {k: [] for k in "kpch"}
            ok = True
            for key, t in tables.items():  # compile everything once
                _, good = migrate(t, n, pool, f"bench-{key}")
                ok &= good
            local_baselines(n)
            for rep in range(reps):
                order = ["k", "p"] if rep % 2 == 0 else ["p", "k"]
                for key in order:
                    s, good = migrate(tables[key], n, pool, f"bench-{key}")
                    times[key].append(s)
                    ok &= good
                for key, s in local_baselines(n).items():
                    times[key].append(s)
            rows.append((n, {k: float(np.median(v)) * 1e6 for k, v in times.items()}, ok))
    finally:
        for t in tables.values():
            t.close()
        ray.shutdown()
    page_kib = PAGE * 2 * KV_HEADS * HEAD_DIM * 4 // 1024
    print(
        f"KV migration shard 0 -> shard 3 of 4 shard processes x 1 CPU device, {page_kib} KiB "
        f"per page, {reps} interleaved reps, p50 (copy inside the processes, max over them)"
    )
    print()
    print(
        f"{'pages':>5} | {'(k) KV channel':>15} {'(p) ppermute':>13} {'(c) device_put':>15} "
        f"{'(h) via host':>13} | {'k/p':>6} {'k/c':>6} {'k/h':>6} | {'ok':>3}"
    )
    print(f"{'':>5} | {'us/page':>15} {'us/page':>13} {'us/page':>15} {'us/page':>13} |")
    for n, t, ok in rows:
        k, p, c, h = (t[x] / n for x in "kpch")
        print(
            f"{n:>5} | {k:>15.1f} {p:>13.1f} {c:>15.1f} {h:>13.1f} | {k / p:>5.2f}x "
            f"{k / c:>5.1f}x {k / h:>5.1f}x | {'yes' if ok else 'NO':>3}"
        )
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
