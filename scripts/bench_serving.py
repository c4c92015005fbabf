"""Serving-step costs of the sharded table: step inputs built in the shards, KV migration.

1. (issue 10) Per step on a 1024-row table, 4 shards, 8192-token budget, KV-local pools:
   every live row decodes one token, a few rows prefill chunks of up to 512 tokens (each
   shard within its 2048 tokens), rows grow a page every ``page_size`` tokens, requests
   finish and new ones take their rows, and each shard reorders two of its rows. The same
   seeded steps are replayed on two identical tables, one committed with the schedule and
   one without, interleaved step by step; the driver-side ``compute_slot_mapping`` of the
   old way is timed on the same steps.
2. (issue 11) Migration cost per page: a row moves from shard 0 to shard 3 with
   ``move_row(src, tgt, page_ids=new)``, and ``sp.apply_kv_copies`` copies its KV on the
   8-device cache, against a one-device ``jnp`` copy and a plain ``jax.device_put`` of the
   same pages (and ``apply_kv_copies`` on a one-device cache, which separates its copy loop
   from the cross-device part), interleaved.

    scripts/dev.sh bench bench_serving            # full run (local and Ray backends)
    scripts/dev.sh bench bench_serving --quick    # smoke run (small sizes, no Ray)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import sharded_pagetable as sp  # noqa: E402
from sharded_pagetable.routing.mesh import build_mesh  # noqa: E402
from sharded_pagetable.serving.attention import kv_sharding, zeros_kv_cache  # noqa: E402

PAGE_SIZES, SHARDS, CHUNK, TARGET_RATIO = (16, 64), 4, 512, 1.3
NOISE = (
    "note: shared, noisy 2-core machine; every figure is a median of interleaved runs "
    "measured side by side in this one run: read the ratios, not the absolute times"
)


@dataclass(frozen=True)
class Sizes:
    rows: int
    max_len: int
    budget: int
    pages_per_shard: int
    ctx: tuple[int, int]  # tokens already computed by the initial requests
    prompt: tuple[int, int]  # prompt of a new request
    output: tuple[int, int]  # tokens a request decodes
    steps: int  # timed steps
    warm: int  # untimed steps first (the first compiles the step-input build)
    reps: int  # migration repetitions
    migrate_pages: tuple[int, ...]  # pages per row moved in part 2
    kv_heads: int
    head_dim: int
    warmup: bool  # compile the tables' update buckets at start-up


FULL = Sizes(
    1024, 32768, 8192, 1 << 17, (256, 4096), (256, 2048), (16, 512), 200, 10, 40, (16, 64), 8, 128,
    True,
)  # fmt: skip
QUICK = Sizes(
    256, 4096, 2048, 1 << 14, (64, 1024), (64, 1024), (8, 128), 8, 2, 5, (4, 16), 8, 128, False
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    """One scheduler step, replayed identically on every table."""

    ops: tuple[tuple[str, tuple[Any, ...]], ...]
    sched: np.ndarray  # i32[R] tokens scheduled per row
    done: np.ndarray  # i32[R] tokens computed before this step
    token_rows: np.ndarray  # i32[T] row of each scheduled token, rows in order
    positions: np.ndarray  # i32[T]


class DecodeHeavy:
    """A whole-table scheduler with KV-local pools: host bookkeeping only, never reads a table.

    Every row holds a request. Decode rows schedule 1 token; prefill rows (new requests)
    schedule chunks of up to ``CHUNK`` tokens in row order with what is left of their shard's
    budget. A finished request's row gets a new request at once (``clear_row`` + ``add_row``);
    its pages return to the pool one step later. Each shard swaps two random rows per step.
    """

    def __init__(self, sizes: Sizes, seed: int) -> None:
        self.z = sizes
        self.rng = np.random.default_rng(seed)
        self.rps = sizes.rows // SHARDS
        self.tokens_per_shard = sizes.budget // SHARDS
        p = sizes.pages_per_shard
        # per shard and group, free global page ids (pop() takes the lowest; page s*P is kept
        # out, as EasyDeL keeps page 0 as its null page)
        self.free = [
            [list(range((s + 1) * p - 1, s * p, -1)) for _ in PAGE_SIZES] for s in range(SHARDS)
        ]
        self.pages: list[list[list[int]]] = [[[] for _ in PAGE_SIZES] for _ in range(sizes.rows)]
        self.done = self.rng.integers(*sizes.ctx, size=sizes.rows)  # i64[R]
        self.prompt = self.done.copy()  # initial requests are decoding
        self.left = self.rng.integers(*sizes.output, size=sizes.rows)  # tokens still to decode
        self._release: list[tuple[int, int, list[int]]] = []

    def _take(self, row: int, group: int, n: int) -> list[int]:
        free = self.free[row // self.rps][group]
        if len(free) < n:
            raise RuntimeError(f"pool of shard {row // self.rps} ran out of pages: raise P")
        ids = [free.pop() for _ in range(n)]
        self.pages[row][group] += ids
        return ids

    def init_ops(self) -> list[tuple[str, tuple[Any, ...]]]:
        ops = []
        for r in range(self.z.rows):
            new = [
                self._take(r, g, sp.cdiv(int(self.done[r]), s)) for g, s in enumerate(PAGE_SIZES)
            ]
            ops.append(("add_row", (new, r)))
        return ops

    def step(self) -> Step:
        z, rng, ops = self.z, self.rng, []
        for s, g, ids in self._release:
            self.free[s][g] += ids[::-1]
        self._release = []
        finished = np.flatnonzero(self.left <= 0)
        for r in finished:
            self._release += [(r // self.rps, g, ids) for g, ids in enumerate(self.pages[r])]
            self.pages[r] = [[] for _ in PAGE_SIZES]
            self.done[r] = 0
            self.prompt[r] = rng.integers(*z.prompt)
            self.left[r] = rng.integers(*z.output)
        sched = (self.done >= self.prompt).astype(np.int64)  # decode rows: 1 token
        for s in range(SHARDS):
            block = slice(s * self.rps, (s + 1) * self.rps)
            budget = self.tokens_per_shard - int(sched[block].sum())
            for r in np.flatnonzero(self.done[block] < self.prompt[block]) + s * self.rps:
                chunk = min(int(self.prompt[r] - self.done[r]), CHUNK, budget)
                sched[r], budget = chunk, budget - chunk
        need = self.done + np.maximum(sched, 1)  # tokens each row's pages must cover
        for r in finished:
            new = [self._take(r, g, sp.cdiv(int(need[r]), s)) for g, s in enumerate(PAGE_SIZES)]
            ops += [("clear_row", (int(r),)), ("add_row", (new, int(r)))]
        grow = [sp.cdiv(need, s) - np.array([len(p[g]) for p in self.pages]) for g, s in enumerate(PAGE_SIZES)]  # fmt: skip
        rows = np.flatnonzero((grow[0] > 0) | (grow[1] > 0))
        per_req = [[self._take(r, g, max(int(grow[g][r]), 0)) for g in range(2)] for r in rows]
        ops.append(("append_rows_batch", (per_req, [int(r) for r in rows])))
        for s in range(SHARDS):  # decode-first reorder, within the shard (no KV to copy)
            a, b = (int(x) for x in rng.choice(self.rps, 2, replace=False) + s * self.rps)
            ops.append(("swap_row", (a, b)))
            for arr in (self.done, self.prompt, self.left, sched):
                arr[[a, b]] = arr[[b, a]]
            self.pages[a], self.pages[b] = self.pages[b], self.pages[a]
        token_rows = np.repeat(np.arange(z.rows), sched)
        starts = np.repeat(np.cumsum(sched) - sched, sched)
        positions = np.repeat(self.done, sched) + np.arange(token_rows.size) - starts
        step = Step(
            tuple(ops),
            sched.astype(np.int32),
            self.done.astype(np.int32),
            token_rows.astype(np.int32),
            positions.astype(np.int32),
        )
        was_prefill = self.done < self.prompt
        self.done += sched
        self.left -= (~was_prefill | (self.done >= self.prompt)) & (sched > 0)  # a token sampled
        return step


def apply(table: sp.ShardedPageTable, ops) -> None:
    for name, args in ops:
        getattr(table, name)(*args)


def _sync(arrays: list) -> None:
    jax.block_until_ready(arrays)


def _sync_step(arrays: list, step: Any) -> None:
    jax.block_until_ready((arrays, step.inputs))


def pct(xs: list[float]) -> dict:
    us = np.asarray(xs) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99))}


def bench_step(name: str, make: Callable[[], sp.ShardedPageTable], z: Sizes, init, plan) -> dict:
    """Interleaved (c) commit with schedule on table A, (d) without on table B, and (a) the
    driver's slot mapping over the whole batch; ``+sync`` adds a ``run_on_shards`` that
    waits for the shards' device work (and hands the step inputs over)."""
    a, b = make(), make()
    try:
        for t in (a, b):
            apply(t, init)
            t.commit(z.rows)
        times: dict[str, list[float]] = {k: [] for k in ("a", "c", "d", "c_sync", "d_sync")}
        gc.disable()
        for k, step in enumerate(plan):
            for t in (a, b) if k % 2 == 0 else (b, a):
                sched = t is a
                kw = {"num_scheduled_tokens": step.sched, "num_computed_tokens": step.done}
                apply(t, step.ops)
                t0 = time.perf_counter()
                t.commit(z.rows, **(kw if sched else {}))
                t1 = time.perf_counter()
                t.run_on_shards(_sync_step, step=True) if sched else t.run_on_shards(_sync)
                t2 = time.perf_counter()
                if k >= z.warm:
                    times["c" if sched else "d"].append(t1 - t0)
                    times["c_sync" if sched else "d_sync"].append(t2 - t0)
            t0 = time.perf_counter()
            slots = [a.compute_slot_mapping(g, step.token_rows, step.positions) for g in (0, 1)]
            if k >= z.warm:
                times["a"].append(time.perf_counter() - t0)
        gc.enable()
        checked = check_step_inputs(a, step, slots)
    finally:
        for t in (b, a):
            t.close()
    out = {"backend": name, "steps": len(plan) - z.warm, "step_inputs_match": checked}
    out.update({k: pct(v) for k, v in times.items()})
    pairs = np.array(times["c"]) / np.array(times["d"])
    out["ratio_p50"] = out["c"]["p50_us"] / out["d"]["p50_us"]
    out["ratio_paired_median"] = float(np.median(pairs))
    out["ratio_sync_p50"] = out["c_sync"]["p50_us"] / out["d_sync"]["p50_us"]
    out["build_p50_us"] = out["c"]["p50_us"] - out["d"]["p50_us"]
    out["build_sync_p50_us"] = out["c_sync"]["p50_us"] - out["d_sync"]["p50_us"]
    return out


def check_step_inputs(table: sp.ShardedPageTable, step: Step, slots: list[np.ndarray]) -> bool:
    """The shards' last slot mapping (shard blocks) equals the driver's (global row order)."""
    snap = table.step_snapshot()
    per = table.max_num_batched_tokens // SHARDS
    rows_per_shard = table.max_num_reqs // SHARDS
    shard_of = step.token_rows // rows_per_shard
    for g, driver in enumerate(slots):
        driver = driver[: step.token_rows.size]
        for s in range(SHARDS):
            want = driver[shard_of == s]
            got = snap.slot_mapping[g][s * per : (s + 1) * per]
            if not np.array_equal(got[: want.size], want):
                return False
            if (got[want.size :] != sp.SLOT_MAPPING_PADDING_VAL).any():
                return False
    return True


def print_step(results: list[dict], z: Sizes, plan: list[Step], sched: DecodeHeavy) -> None:
    timed = plan[z.warm :]
    tokens = [int(s.sched.sum()) for s in timed]
    prefill = [int(s.sched[s.sched > 1].sum()) for s in timed]
    grown = [len(dict(s.ops)["append_rows_batch"][1]) for s in timed]
    print(
        f"1. serving step: {z.rows} rows, page sizes {PAGE_SIZES}, max_model_len {z.max_len}, "
        f"{SHARDS} shards, budget {z.budget} ({z.budget // SHARDS} per shard), "
        f"pages_per_shard {z.pages_per_shard}; {len(timed)} timed steps after {z.warm} warm-up"
    )
    print(
        f"   schedule per step (median): {np.median(tokens):.0f} tokens "
        f"({np.median(tokens) - np.median(prefill):.0f} decode + {np.median(prefill):.0f} "
        f"prefill), {np.median(grown):.0f} rows growing pages; all {z.rows} rows live"
    )
    ctx = int(np.median(sched.done))
    pages = [sp.cdiv(ctx, s) for s in PAGE_SIZES]
    per_page = [s * 2 * z.kv_heads * z.head_dim * 4 for s in PAGE_SIZES]
    moved = sum(n * b for n, b in zip(pages, per_page, strict=True))
    print(
        f"   median row holds {ctx} tokens = {pages} pages: migrating it moves "
        f"{moved / 2**20:.1f} MiB of KV ({z.kv_heads} kv heads x {z.head_dim}, f32, both groups)"
    )
    print()
    print(f"{'backend':<30} {'measurement':<52} {'p50 us':>9} {'p99 us':>9}")
    rows = [
        ("a", "(a) driver compute_slot_mapping, 2 groups"),
        ("c", "(c) commit with schedule"),
        ("d", "(d) commit without schedule"),
        ("c_sync", "(c) + run_on_shards wait (step inputs handed over)"),
        ("d_sync", "(d) + run_on_shards wait"),
    ]
    for r in results:
        for i, (key, label) in enumerate(rows):
            name = r["backend"] if i == 0 else ""
            print(f"{name:<30} {label:<52} {r[key]['p50_us']:>9.0f} {r[key]['p99_us']:>9.0f}")
        print(f"{'':<30} {'(b) = (c) - (d): step inputs built in the shards':<52} "
              f"{r['build_p50_us']:>9.0f} {'-':>9}")  # fmt: skip
        print(
            f"{'':<30} (c)/(d) {r['ratio_p50']:.2f}x (paired median "
            f"{r['ratio_paired_median']:.2f}x), with wait {r['ratio_sync_p50']:.2f}x; "
            f"(b)/(a) {r['build_p50_us'] / r['a']['p50_us']:.2f}x; "
            f"shard slots == driver slots: {'yes' if r['step_inputs_match'] else 'NO'}"
        )
    print()


def make_tables(z: Sizes, with_ray: bool) -> list[tuple[str, Callable[[], sp.ShardedPageTable]]]:
    shape = (z.rows, z.max_len, z.budget, PAGE_SIZES)
    kw = {"num_shards": SHARDS, "pages_per_shard": z.pages_per_shard, "warmup": z.warmup}
    out = [(f"local, {SHARDS} shards x 2 devices", lambda: sp.ShardedPageTable(*shape, **kw))]
    if with_ray:
        ray_kw = {"backend": "ray", "ray": {"devices_per_shard": 2, "timeout_s": 120}}
        out.append(
            (f"ray, {SHARDS} processes x 2 devices", lambda: sp.ShardedPageTable(*shape, **kw, **ray_kw))
        )  # fmt: skip
    return out


class MigrationRig:
    """A table with pools of ``pool`` pages per shard and its 8-device KV cache (page ``p``
    holds the value ``p``), plus one device's pool alone, for the per-row measurements."""

    ROWS, SRC_ROW, TGT_ROW = 64, 0, 48  # row 48 lives on shard 3

    def __init__(self, z: Sizes, pool: int) -> None:
        mesh = build_mesh(None, "data")
        self.devices = list(mesh.devices.flat)
        self.pool = pool
        self.per_dev = pool * SHARDS // len(self.devices)
        self.table = sp.ShardedPageTable(
            self.ROWS, 4096, 256, [PAGE_SIZES[0]], num_shards=SHARDS, pages_per_shard=pool,
            warmup=False,
        )  # fmt: skip
        kv = zeros_kv_cache(mesh, pool * SHARDS, PAGE_SIZES[0], z.kv_heads, z.head_dim)
        fill = jax.jit(
            lambda x: x + jnp.arange(x.shape[0], dtype=x.dtype)[:, None, None, None],
            donate_argnums=0,
            out_shardings=kv_sharding(mesh),
        )
        self.kv = fill(kv)
        shape = (self.per_dev, *kv.shape[1:])
        self.local = jax.device_put(np.zeros(shape, np.float32), self.devices[0])
        self.one = jax.device_put(np.zeros(shape, np.float32), self.devices[0])
        self._take = jax.jit(lambda x, i: jnp.take(x, i, axis=0))

    def setup(self, n: int) -> None:
        """Row ``SRC_ROW`` holds pages ``1..n`` (shard 0's pool, device 0); it will move onto
        ``n`` pages of shard 3's pool (device 6)."""
        self.n = n
        self.src_pages = list(range(1, n + 1))
        self.new = [3 * self.pool + 1 + i for i in range(n)]
        self.table.add_row([self.src_pages], self.SRC_ROW)
        self.table.commit(self.ROWS)
        self.idx = jax.device_put(np.arange(1, n + 1, dtype=np.int32), self.devices[0])
        self.moved = self._take(self.local, self.idx).block_until_ready()
        self.dst_dev = self.devices[self.new[0] // self.per_dev]
        self.one_plan = np.array([np.arange(n), np.arange(n, 2 * n)], np.int32)

    def teardown(self) -> None:
        self.table.clear_row(self.SRC_ROW)
        self.table.commit(self.ROWS)

    def table_move(self) -> None:
        """(t) move_row across shards with fresh pages and the commit that plans the copy;
        the clear of the target row it leaves is published by :meth:`publish` (untimed)."""
        self.table.move_row(self.SRC_ROW, self.TGT_ROW, page_ids=[self.new])
        self.plan = self.table.commit(self.ROWS).kv_copies[0]
        self.table.clear_row(self.TGT_ROW)

    def publish(self) -> None:
        self.table.commit(self.ROWS)

    def apply_copies(self) -> None:  # (a)
        self.kv = sp.apply_kv_copies(self.kv, self.plan)
        self.kv.block_until_ready()

    def one_device_copy(self) -> None:  # (b)
        self._take(self.local, self.idx).block_until_ready()

    def device_put(self) -> None:  # (c)
        jax.device_put(self.moved, self.dst_dev).block_until_ready()

    def one_device_apply(self) -> None:  # (o)
        self.one = sp.apply_kv_copies(self.one, self.one_plan)
        self.one.block_until_ready()

    def copy_correct(self) -> bool:
        copied = np.asarray(self.kv[np.array(self.new)])[:, 0, 0, 0]
        return self.plan.shape == (2, self.n) and np.array_equal(copied, self.src_pages)


def bench_migration(z: Sizes) -> list[dict]:
    """Per row of ``n`` pages: (a) apply_kv_copies shard 0 -> 3, (b) a jitted one-device copy
    of the same pages, (c) a device_put of them to the destination device, (o)
    apply_kv_copies of as many pages within a one-device cache of one device's pool, (t) the
    table's move_row + commit that yields the plan; interleaved, rotating the order."""
    rig = MigrationRig(z, pool=4 * max(z.migrate_pages))
    page_bytes = PAGE_SIZES[0] * 2 * z.kv_heads * z.head_dim * 4
    fns = {
        "t": rig.table_move,
        "a": rig.apply_copies,
        "b": rig.one_device_copy,
        "c": rig.device_put,
        "o": rig.one_device_apply,
    }
    out = []
    try:
        for n in z.migrate_pages:
            rig.setup(n)
            for f in fns.values():  # the plan, and every compile, before timing
                f()
            correct = rig.copy_correct()
            times: dict[str, list[float]] = {k: [] for k in fns}
            gc.disable()
            for rep in range(z.reps):
                keys = list(fns)[rep % len(fns) :] + list(fns)[: rep % len(fns)]
                for key in keys:
                    if key == "t":
                        rig.publish()
                    t0 = time.perf_counter()
                    fns[key]()
                    times[key].append(time.perf_counter() - t0)
            gc.enable()
            rig.publish()
            rig.teardown()
            res = {"pages": n, "bytes_per_row": n * page_bytes, "copy_correct": bool(correct)}
            res.update({k: pct(v) for k, v in times.items()})
            out.append(res)
    finally:
        rig.table.close()
    return out


def print_migration(results: list[dict], z: Sizes) -> None:
    page_kib = PAGE_SIZES[0] * 2 * z.kv_heads * z.head_dim * 4 / 1024
    print(
        f"2. migration: a row moves shard 0 -> shard 3 (move_row with page_ids, then "
        f"apply_kv_copies of receipt.kv_copies); KV f32 [pages, {PAGE_SIZES[0]}, "
        f"2*{z.kv_heads}, {z.head_dim}] = {page_kib:.0f} KiB per page, sharded over 8 devices "
        f"(shard 0 = devices 0-1, shard 3 = devices 6-7); {z.reps} interleaved reps, p50"
    )
    print()
    print(
        f"{'pages':>5} {'KV/row MiB':>10} | {'(a) apply_kv_copies':>20} {'(b) 1-dev copy':>15} "
        f"{'(c) device_put':>15} {'(o) 1-dev apply':>16} | {'a/b':>6} {'a/c':>6} {'o/b':>6} | "
        f"{'move_row+commit':>15} {'ok':>3}"
    )
    print(
        f"{'':>5} {'':>10} | {'us/row':>9} {'us/page':>10} {'us/page':>15} {'us/page':>15} "
        f"{'us/page':>16} | {'':>6} {'':>6} {'':>6} | {'us/row':>15} {'':>3}"
    )
    for r in results:
        n = r["pages"]
        a, b, c, o = (r[k]["p50_us"] for k in "abco")
        print(
            f"{n:>5} {r['bytes_per_row'] / 2**20:>10.1f} | {a:>9.0f} {a / n:>10.1f} "
            f"{b / n:>15.1f} {c / n:>15.1f} {o / n:>16.1f} | {a / b:>5.1f}x {a / c:>5.1f}x "
            f"{o / b:>5.1f}x | "
            f"{r['t']['p50_us']:>15.0f} {'yes' if r['copy_correct'] else 'NO':>3}"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few reps, no Ray")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    z = QUICK if args.quick else FULL
    with_ray = not (args.quick or args.no_ray)
    t_start = time.perf_counter()
    print(NOISE)
    print()
    sched = DecodeHeavy(z, seed=0)
    init = sched.init_ops()
    plan = [sched.step() for _ in range(z.warm + z.steps)]
    step_results, errors = [], []
    ray_started = False
    for name, make in make_tables(z, with_ray):
        try:
            if name.startswith("ray") and not ray_started:
                from ray_actors.cluster import start_local

                start_local(namespace="bench_serving")
                ray_started = True
            step_results.append(bench_step(name, make, z, init, plan))
        except Exception as exc:  # a backend that cannot run is reported, not fatal
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    if ray_started:
        import ray

        ray.shutdown()
    if step_results:
        print_step(step_results, z, plan, sched)
    migration = bench_migration(z)
    print_migration(migration, z)
    targets = []
    for r in step_results:
        ok = r["ratio_p50"] <= TARGET_RATIO
        targets.append({"backend": r["backend"], "ratio": r["ratio_p50"], "pass": ok})
        print(
            f"target commit with schedule <= {TARGET_RATIO}x one without ({r['backend']}): "
            f"{r['ratio_p50']:.2f}x -> {'PASS' if ok else 'MISS'}"
        )
    for e in errors:
        print(f"skipped {e}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        doc = {
            "meta": {**asdict(z), "page_sizes": PAGE_SIZES, "shards": SHARDS, "note": NOISE},
            "step": step_results,
            "migration": migration,
            "targets": targets,
            "errors": errors,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
