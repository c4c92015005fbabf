"""Serving chaos soak: a model step on every shard while shard processes are SIGKILLed.

A ``ShardedPageTable`` with KV-local pools on survivable Ray shards serves the data-parallel
workload with migrations (:class:`ShardedServingWorkload`); every step runs
:func:`~sharded_pagetable.serving.runner.serve_step` in the shard processes (KV copies, K/V
writes, paged attention) and checks every scheduled token's output against dense attention
recomputed on the driver from that request's own K/V. Shards are killed between commits,
inside a commit (sent, not acked) and inside a model step; recovery is automatic. The rows
a recovery reports in ``lost_kv_rows`` are the only ones whose KV may be gone: their
requests are recomputed (their whole context prefilled again) and their tokens are left out
of the check until then; every other token must match. After every commit the device
tables are compared with an independent replay of the same row operations on a
single-process ``MultiGroupPageTable`` and every shard must report the same epoch.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

import sharded_pagetable as sp
from sharded_pagetable.serving.runner import (
    AttentionConfig,
    drop_cache,
    serve_step,
    token_errors,
)
from sharded_pagetable.serving.sharded_workload import ShardedServingWorkload
from sharded_pagetable.serving.workload import WorkloadConfig, apply_ops

from .chaos import ChaosReport, _check, _kill, kill_after_send, wait_for_exit


@dataclass(frozen=True)
class ServingChaosConfig:
    """Sizes of a serving soak: ``kills`` at distinct random steps, ``in_commit`` of them
    inside the commit and ``in_step`` inside the model step, the rest between commits."""

    steps: int = 200
    kills: int = 50
    in_commit: int = 15
    in_step: int = 10
    seed: int = 0
    num_shards: int = 4
    max_num_reqs: int = 32
    max_model_len: int = 256
    page_sizes: tuple[int, ...] = (16, 32)
    token_budget: int = 128
    pages_per_shard: int = 96
    timeout_s: float = 20.0
    max_recoveries: int = 3
    survivable: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.in_commit + self.in_step <= self.kills <= self.steps:
            raise ValueError(
                f"need 0 <= in_commit + in_step <= kills <= steps, got {self.in_commit}, "
                f"{self.in_step}, {self.kills}, {self.steps}"
            )


@dataclass
class ServingChaosReport(ChaosReport):
    kills_in_step: int = 0
    tokens_checked: int = 0
    tokens_wrong: int = 0  # tokens of rows not reported lost whose attention differed
    worst_error: float = 0.0
    migrations: int = 0
    survivors_restarted: int = 0  # processes of non-victim shards a recovery replaced

    @property
    def ok(self) -> bool:
        return super().ok and self.tokens_wrong == 0 and self.survivors_restarted == 0

    def summary(self) -> str:
        return (
            super().summary()
            + f", kills inside a model step {self.kills_in_step}, survivors restarted "
            f"{self.survivors_restarted}, migrations {self.migrations}, tokens checked "
            f"{self.tokens_checked}, tokens wrong {self.tokens_wrong} (worst error "
            f"{self.worst_error:.1e})"
        )


def _replay_ops(ops):
    """The ops for a single-process table: a move with fresh pages is that row added anew."""
    for name, args in ops:
        if name == "move_row" and len(args) == 3:
            _, tgt, pages = args
            yield "add_row", (pages, tgt)
        else:
            yield name, args


def _slow_on(victim_pid: int):
    """A model step that the shard process ``victim_pid`` does not get past (it is killed
    while it waits); every other process runs it at once."""

    def step_fn(arrays, step, cfg, uids):
        if os.getpid() == victim_pid:
            time.sleep(60)
        return serve_step(arrays, step, cfg, uids)

    return step_fn


class _Soak:
    """One soak's table, replay, workload and report."""

    def __init__(self, c: ServingChaosConfig) -> None:
        self.c = c
        self.rng = np.random.default_rng(c.seed)
        self.table = sp.ShardedPageTable(
            c.max_num_reqs,
            c.max_model_len,
            c.token_budget,
            c.page_sizes,
            num_shards=c.num_shards,
            pages_per_shard=c.pages_per_shard,
            backend="ray",
            recover="auto",
            max_recoveries=c.max_recoveries,
            ray={"devices_per_shard": 1, "timeout_s": c.timeout_s, "survivable": c.survivable},
        )
        self.replay = sp.MultiGroupPageTable(
            c.max_num_reqs, c.max_model_len, c.token_budget, c.page_sizes, warmup=False
        )
        self.workload = ShardedServingWorkload(
            WorkloadConfig(
                seed=c.seed,
                arrivals_per_step=1.5,
                prompt_len=(4, c.max_model_len // 4),
                output_len=(8, c.max_model_len // 4),
                token_budget=c.token_budget,
            ),
            c.max_num_reqs,
            c.max_model_len,
            c.page_sizes,
            c.num_shards,
            c.pages_per_shard,
            migrate=True,
        )
        self.cfg = AttentionConfig("chaos-serving", c.page_sizes, c.num_shards, c.pages_per_shard)
        self.report = ServingChaosReport()
        self.published = np.full(c.max_num_reqs, -1, np.int64)  # request of each row
        self.lost: set[int] = set()  # requests whose KV a recovery reported lost
        self.killed: set[int] = set()  # pids this soak SIGKILLed

    def pids(self) -> list[int]:
        return [w["pid"] for w in self.table._backend.placements]

    def kill(self, shard: int | None = None) -> int:
        """SIGKILL a shard process (``shard``, or one picked at random); returns the shard."""
        pid_of = {s: p for s, p in enumerate(self.pids())}
        shard = _kill(self.table, self.rng, shard)
        self.killed.add(pid_of[shard])
        return shard

    def recovered(self, since: int, pids: list[int]) -> None:
        """Count what the recoveries since ``since`` did (``pids``: the shard processes
        before); the rows they report lost are read against the rows as published then."""
        table, report = self.table, self.report
        if len(table.recoveries) == since:
            return
        report.recovery_s += table.recoveries[since:]
        now = self.pids()
        replaced = [a for a, b in zip(pids, now, strict=True) if a != b]
        report.shards_replaced += len(replaced)
        report.survivors_restarted += sum(p not in self.killed for p in replaced)
        rows = table.lost_kv_rows
        report.kv_rows_lost += int(rows.size)
        self.lost.update(int(u) for u in self.published[rows] if u >= 0)

    def commit(self, step: int, st, kill: str | None) -> None:
        table, report = self.table, self.report
        pids = self.pids()
        if kill == "between":
            self.kill()
            report.kills += 1
        before = len(table.recoveries)
        kwargs = {"num_scheduled_tokens": st.scheduled, "num_computed_tokens": st.computed}
        if kill == "commit":
            shard = int(self.rng.integers(self.c.num_shards))
            self.killed.add(pids[shard])
            with kill_after_send(table, None, shard):
                table.commit(st.num_reqs, **kwargs)
            report.kills += 1
            report.kills_in_commit += 1
        else:
            table.commit(st.num_reqs, **kwargs)
        self.replay.commit(st.num_reqs)
        self.recovered(before, pids)  # against the rows published before this step
        self.published = np.full(self.c.max_num_reqs, -1, np.int64)
        self.published[: st.num_reqs] = st.row_uids
        pids, before = self.pids(), len(table.recoveries)
        _check(table, self.replay, report)  # a read may find a dead shard and recover too
        self.recovered(before, pids)

    def serve(self, uids: np.ndarray, kill: bool) -> list:
        table, report = self.table, self.report
        pids, before, fn, victim = self.pids(), len(table.recoveries), serve_step, -1
        if kill:
            victim = int(self.rng.integers(self.c.num_shards))
            fn = _slow_on(pids[victim])
            killer = threading.Timer(0.3, self.kill, args=(victim,))
            killer.start()
        results = table.run_on_shards(fn, self.cfg, uids, step=True)
        if kill:
            killer.join()
            wait_for_exit(pids[victim], 10)
            report.kills += 1
            report.kills_in_step += 1
        self.recovered(before, pids)
        return results

    def step(self, step: int, kill: str | None) -> None:
        c = self.c
        st = self.workload.step()
        apply_ops(self.table, st.ops)
        apply_ops(self.replay, list(_replay_ops(st.ops)))
        uids = np.full(c.max_num_reqs, -1, np.int32)
        uids[: st.num_reqs] = st.row_uids
        self.lost = set()
        self.commit(step, st, kill if kill != "step" else None)
        results = self.serve(uids, kill == "step")
        _check_tokens(self.cfg, results, uids, self.lost, self.report)
        if self.lost:
            self.workload.recompute(self.lost)
        self.report.migrations = self.workload.migrations
        self.report.steps += 1

    def close(self) -> None:
        try:
            self.table.run_on_shards(lambda arrays, name: drop_cache(name), self.cfg.name)
        finally:
            self.table.close()


def run_serving_chaos(config: ServingChaosConfig, progress=None) -> ServingChaosReport:
    """Run the soak on a local Ray (started by the caller) and report."""
    c = config
    rng = np.random.default_rng(c.seed + 1)
    kill_steps = rng.choice(np.arange(1, c.steps), size=c.kills, replace=False).tolist()
    kinds = {s: "commit" for s in kill_steps[: c.in_commit]}
    kinds.update({s: "step" for s in kill_steps[c.in_commit : c.in_commit + c.in_step]})
    kinds.update({s: "between" for s in kill_steps[c.in_commit + c.in_step :]})
    soak = _Soak(c)
    try:
        for step in range(c.steps):
            soak.step(step, kinds.get(step))
            if progress is not None:
                progress(soak.report)
        soak.report.recoveries = len(soak.table.recoveries)
    finally:
        soak.close()
    return soak.report


def _check_tokens(cfg, results, uids, lost: set[int], report) -> None:
    errors = token_errors(cfg, results, uids, skip=lost)
    report.tokens_checked += errors.size
    report.worst_error = max(report.worst_error, float(errors.max(initial=0.0)))
    report.tokens_wrong += int((errors > 1e-4).sum())
