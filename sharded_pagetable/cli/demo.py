"""The demo's scheduler loop: row ops, one commit, and (with page pools) one model step.

With ``pages_per_shard`` in the config every step is served: the commit carries the
schedule (per-row counts), then :func:`~sharded_pagetable.serving.runner.serve_step` runs in
every shard process (each shard builds its step inputs on its own devices when the step
asks for them, then KV copies of migrated rows, K/V writes, paged attention), and every ``check_every`` steps each
scheduled token's output is compared with dense attention recomputed on the driver. Without
pools the table is only committed (the workload of one shared pool has no KV-local pages).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

TOLERANCE = 1e-4  # float32 paged vs dense attention; the serving tests use the same bound


@dataclass
class DemoStats:
    """What the run measured, one entry per step where it is a list."""

    commit_us: list[float] = field(default_factory=list)  # commit, with the schedule if served
    serve_us: list[float] = field(default_factory=list)  # run_on_shards(serve_step), inputs built
    dirty: list[int] = field(default_factory=list)  # row updates sent
    sent: list[int] = field(default_factory=list)  # bytes sent
    live: list[int] = field(default_factory=list)  # num_reqs
    tokens: list[int] = field(default_factory=list)  # tokens scheduled
    cross: int = 0  # move_row/swap_row ops whose rows lie in different shards
    checks: int = 0
    rows_checked: int = 0
    tokens_checked: int = 0
    max_error: float | None = None
    pages_moved: list[int] = field(default_factory=list)  # per group, from the receipts
    problems: list[str] = field(default_factory=list)
    kills: int = 0  # shard processes SIGKILLed (--kill-every)
    recovery_s: list[float] = field(default_factory=list)
    kv_rows_lost: int = 0  # rows whose KV recoveries reported lost (their requests recomputed)
    survivors_restarted: int = 0  # processes of shards that were not killed, yet replaced


def _drop_kv(arrays, name: str) -> None:
    """``run_on_shards`` body: free this process's KV caches of the demo."""
    from ..serving.runner import drop_cache

    drop_cache(name)


def live_rows(workload) -> dict[int, tuple[int, list[list[int]]]]:
    """Global row -> (request id, global page ids per group) of every live request."""
    shards = getattr(workload, "shards", None)
    if shards is None:
        return {row: (req.rid, req.pages) for row, req in enumerate(workload.rows)}
    rps, pps = workload.rows_per_shard, workload.pages_per_shard
    return {
        s * rps + i: (req.rid, [[p + s * pps for p in ids] for ids in req.pages])
        for s, wl in enumerate(shards)
        for i, req in enumerate(wl.rows)
    }


def check_mirror(table, workload, num_reqs: int) -> list[str]:
    """The mirror holds exactly the pages the workload gave each live row, rows below
    ``num_reqs`` without a request hold none, and no page is held twice."""
    problems = []
    rows = live_rows(workload)
    held = workload.live_pages()
    for g in range(len(table)):
        host = table[g]
        for row in range(num_reqs):
            n = int(host.num_pages_per_row[row])
            if row not in rows:
                if n:
                    problems.append(f"group {g}: row {row} holds {n} pages but no request")
                    break
                continue
            rid, pages = rows[row]
            if host.get_cpu_tensor()[row, :n].tolist() != pages[g]:
                problems.append(f"group {g}: row {row} does not hold request {rid}'s pages")
                break
        if len(held[g]) != len(set(held[g])):
            problems.append(f"group {g}: a page id is held by two live rows")
    return problems


def check_devices(table, num_reqs: int) -> list[str]:
    """Compare the device arrays every shard process holds with the mirror, and check that
    together they cover every row."""
    from .checks import host_row_digests, local_row_digests

    problems = []
    per_shard = table.run_on_shards(local_row_digests)
    for g in range(len(table)):
        want = host_row_digests(table[g].get_cpu_tensor())
        seen = np.zeros(want.size, bool)
        for s, blocks in enumerate(per_shard):
            for start, digests in blocks[g]:
                rows = slice(start, start + digests.size)
                seen[rows] = True
                bad = np.flatnonzero(digests != want[rows]) + start
                bad = bad[bad < num_reqs]
                if bad.size:
                    problems.append(
                        f"group {g}: shard process {s} holds rows {bad[:5].tolist()} that differ"
                    )
        if not seen.all():
            problems.append(f"group {g}: rows {np.flatnonzero(~seen)[:5].tolist()} held nowhere")
    return problems


def _cross_shard_ops(ops, rows_per_shard: int) -> int:
    return sum(
        1
        for name, a in ops
        if name in ("move_row", "swap_row") and a[0] // rows_per_shard != a[1] // rows_per_shard
    )


class _Killer:
    """``--kill-every N``: SIGKILL a random shard process every ``N`` steps, between row
    operations and the commit; the commit recovers (``recover: auto``). Counts what the
    recoveries cost and which requests lost their KV (read against the rows as published
    before the step), so they are recomputed and left out of that step's check."""

    def __init__(self, table, every: int, seed: int) -> None:
        self.table = table
        self.every = every
        self.rng = np.random.default_rng(seed)
        self.published = np.full(table.layout.max_num_reqs, -1, np.int64)  # request per row

    def before_commit(self, step_no: int, stats: DemoStats) -> tuple[int, list[int], int]:
        """Kill a shard if it is time; returns what :meth:`after` compares against."""
        import os
        import signal

        from ray_actors.cluster import wait_for_exit

        if not self.every:
            return len(self.table.recoveries), [], -1
        pids = [w["pid"] for w in self.table._backend.placements]
        victim = -1
        if (step_no + 1) % self.every == 0:
            victim = int(self.rng.integers(self.table.num_shards))
            os.kill(pids[victim], signal.SIGKILL)
            wait_for_exit(pids[victim], 20)
            stats.kills += 1
        return len(self.table.recoveries), pids, victim

    def after(self, mark: tuple[int, list[int], int], stats: DemoStats) -> set[int]:
        since, pids, victim = mark
        table = self.table
        if len(table.recoveries) == since:
            return set()
        stats.recovery_s += table.recoveries[since:]
        if pids:
            now = [w["pid"] for w in table._backend.placements]
            stats.survivors_restarted += sum(
                a != b for s, (a, b) in enumerate(zip(pids, now, strict=True)) if s != victim
            )
        stats.kv_rows_lost += int(table.lost_kv_rows.size)
        return {int(u) for u in self.published[table.lost_kv_rows] if u >= 0}

    def published_step(self, step) -> None:
        self.published[:] = -1
        self.published[: step.num_reqs] = step.row_uids


class _Server:
    """The model step of a table with page pools: commit with the schedule, serve, check."""

    def __init__(self, table, workload, attention, check_every: int) -> None:
        self.table = table
        self.workload = workload
        self.cfg = attention
        self.check_every = check_every

    def step(self, step, stats: DemoStats, check: bool, killer: _Killer, mark) -> set[int]:
        """Commit and serve ``step``; returns the requests whose KV a recovery in the
        commit reported lost (their tokens are not checked: the caller recomputes them)."""
        from ..serving.runner import max_error, serve_step

        t = time.perf_counter()
        receipt = self.table.commit(
            step.num_reqs, num_scheduled_tokens=step.scheduled, num_computed_tokens=step.computed
        )
        stats.commit_us.append((time.perf_counter() - t) * 1e6)
        lost = killer.after(mark, stats)
        killer.published_step(step)
        stats.dirty.append(receipt.rows)
        stats.sent.append(receipt.bytes)
        for g, copies in enumerate(receipt.kv_copies):
            stats.pages_moved[g] += int(copies.shape[1])
        uids = np.full(self.table.layout.max_num_reqs, -1, np.int32)  # i32[max_num_reqs]
        uids[: step.num_reqs] = step.row_uids
        t = time.perf_counter()
        results = self.table.run_on_shards(serve_step, self.cfg, uids, step=True)
        stats.serve_us.append((time.perf_counter() - t) * 1e6)
        if not check and not lost:
            return lost
        n, err = max_error(self.cfg, results, uids, skip=lost)
        stats.tokens_checked += n
        stats.rows_checked += int(np.count_nonzero(step.scheduled))
        stats.max_error = max(err, stats.max_error or 0.0)
        skipped = int(step.scheduled[np.isin(step.row_uids, list(lost))].sum()) if lost else 0
        if n != int(step.scheduled.sum()) - skipped:
            stats.problems.append(f"{n} tokens came back, {int(step.scheduled.sum())} scheduled")
        if not err <= TOLERANCE:  # also catches NaN
            stats.problems.append(f"attention differs from dense by {err:.3g} > {TOLERANCE}")
        return lost


def make_workload(args, config):
    """The serving workload of ``config``: sharded over KV-local pools if it has them."""
    from ..serving.sharded_workload import ShardedServingWorkload
    from ..serving.workload import ServingWorkload, WorkloadConfig

    max_len = config.max_model_len
    wl_config = WorkloadConfig(
        seed=args.seed,
        arrivals_per_step=args.arrivals,
        prompt_len=(min(16, max_len // 4), max(16, min(args.max_prompt, max_len // 2))),
        output_len=(min(8, max_len // 4), max(8, min(args.max_output, max_len // 2))),
        token_budget=config.max_num_batched_tokens,
    )
    shape = (config.max_num_reqs, max_len, config.page_sizes)
    if config.pages_per_shard is None:
        return ServingWorkload(wl_config, *shape)
    return ShardedServingWorkload(
        wl_config, *shape, config.num_shards, config.pages_per_shard, migrate=True
    )


def run(args, config, table) -> tuple[object, DemoStats]:
    """Drive ``table`` for ``args.steps`` steps; returns the workload and what was measured."""
    from tqdm import tqdm

    from ..serving.runner import AttentionConfig
    from ..serving.workload import apply_ops

    workload = make_workload(args, config)
    stats = DemoStats(pages_moved=[0] * len(config.page_sizes))
    server = None
    if config.pages_per_shard is not None:
        attention = AttentionConfig(
            f"demo-{id(table)}",
            tuple(config.page_sizes),
            config.num_shards,
            config.pages_per_shard,
            q_heads=args.q_heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            seed=args.seed,
            row_axis=config.row_axis,
        )
        server = _Server(table, workload, attention, args.check_every)
    rps = table.layout.rows_per_shard
    killer = _Killer(table, getattr(args, "kill_every", 0), args.seed)
    try:
        for step_no in tqdm(range(args.steps), desc="steps", unit="step", disable=args.quiet):
            step = workload.step()
            apply_ops(table, step.ops)
            stats.cross += _cross_shard_ops(step.ops, rps)
            stats.live.append(step.num_reqs)
            stats.tokens.append(int(step.token_rows.size))
            check = (step_no + 1) % args.check_every == 0 or step_no + 1 == args.steps
            mark = killer.before_commit(step_no, stats)
            if server is not None:
                lost = server.step(step, stats, check, killer, mark)
                if lost:
                    workload.recompute(lost)
            else:
                t = time.perf_counter()
                receipt = table.commit(step.num_reqs)
                stats.commit_us.append((time.perf_counter() - t) * 1e6)
                stats.dirty.append(receipt.rows)
                stats.sent.append(receipt.bytes)
            if check:
                stats.checks += 1
                stats.problems += check_mirror(table, workload, step.num_reqs)
                stats.problems += check_devices(table, step.num_reqs)
                if stats.problems:
                    break
        if server is not None and sum(stats.pages_moved) != workload.kv_pages_moved:
            stats.problems.append(
                f"receipts carried {sum(stats.pages_moved)} KV page copies, the workload "
                f"migrated {workload.kv_pages_moved} pages"
            )
        if stats.survivors_restarted and config.backend == "ray" and config.ray.survivable:
            stats.problems.append(
                f"{stats.survivors_restarted} shard processes that were not killed were replaced"
            )
        # Publish everything and compare whole snapshots with the mirror.
        table.commit(config.max_num_reqs)
        for g in range(len(table)):
            if not np.array_equal(table.device_snapshot(g), table[g].get_cpu_tensor()):
                stats.problems.append(f"group {g}: final device snapshot differs from the mirror")
        stats.checks += 1
    finally:
        if server is not None:
            table.run_on_shards(_drop_kv, server.cfg.name)
    return workload, stats


def kv_bytes(stats: DemoStats, config, args) -> list[int]:
    """Per group, bytes of KV the migrations copied: pages x page_size x K and V x kv_heads
    x head_dim x 4 (float32)."""
    per_token = 2 * args.kv_heads * args.head_dim * 4
    return [
        n * size * per_token for n, size in zip(stats.pages_moved, config.page_sizes, strict=True)
    ]


def with_address(config, address: str | None):
    if not address:
        return config
    return dataclasses.replace(config, ray=dataclasses.replace(config.ray, address=address))
