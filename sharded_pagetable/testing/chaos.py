"""Chaos soak: a serving workload while shard processes are SIGKILLed at random points.

Kills land either between commits or inside one (after every shard was sent its frame and
before any ack is read). The table runs with ``recover: auto``; after every commit the
device snapshots are compared with the coordinator's mirror and with an independent replay
of the same operations on a single-process ``MultiGroupPageTable``, and every shard must
report the coordinator's epoch. Kills use ``os.kill`` on the shard's pid, so the shards must
run on this machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field

import numpy as np

import sharded_pagetable as sp
from ray_actors.cluster import wait_for_exit
from sharded_pagetable.serving.workload import ServingWorkload, WorkloadConfig, apply_ops


@dataclass(frozen=True)
class ChaosConfig:
    """Sizes of a soak. ``kills`` happen at distinct random steps; ``in_commit`` of them
    during the commit."""

    steps: int = 80
    kills: int = 10
    in_commit: int = 3
    seed: int = 0
    num_shards: int = 2
    devices_per_shard: int = 2
    max_num_reqs: int = 64
    max_model_len: int = 2048
    max_num_batched_tokens: int = 512
    page_sizes: tuple[int, ...] = (16, 64)
    timeout_s: float = 30.0
    max_recoveries: int = 3
    standby: bool = False  # ray.standby: recover by switching to pre-started shards
    survivable: bool = False  # ray.survivable: replace only the dead shard processes

    def __post_init__(self) -> None:
        if not 0 <= self.in_commit <= self.kills <= self.steps:
            raise ValueError(
                f"need 0 <= in_commit <= kills <= steps, got {self.in_commit}, "
                f"{self.kills}, {self.steps}"
            )


@dataclass
class ChaosReport:
    steps: int = 0
    kills: int = 0
    kills_in_commit: int = 0
    recoveries: int = 0
    rows_lost: int = 0  # rows whose device content differs from the replay
    mixed_epoch_arrays: int = 0  # commits after which a shard held another epoch's rows
    mirror_mismatches: int = 0  # groups whose mirror differs from the replay
    shards_replaced: int = 0  # shard processes that recoveries replaced (victims included)
    kv_rows_lost: int = 0  # live rows whose KV recoveries reported lost (lost_kv_rows)
    recovery_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rows_lost == 0 and self.mixed_epoch_arrays == 0 and self.mirror_mismatches == 0

    def summary(self) -> str:
        p50 = np.percentile(self.recovery_s, 50) if self.recovery_s else float("nan")
        p99 = np.percentile(self.recovery_s, 99) if self.recovery_s else float("nan")
        return (
            f"steps {self.steps}, kills survived {self.kills} ({self.kills_in_commit} inside "
            f"a commit), recoveries {self.recoveries}, rows lost {self.rows_lost}, "
            f"mixed-epoch arrays {self.mixed_epoch_arrays}, mirror mismatches "
            f"{self.mirror_mismatches}, shard processes replaced {self.shards_replaced}, "
            f"rows whose KV was lost {self.kv_rows_lost}, recovery p50 {p50:.2f}s p99 {p99:.2f}s"
        )


def _kill(
    table: sp.ShardedPageTable, rng: np.random.Generator | None, shard: int | None = None
) -> int:
    """SIGKILL one shard process (``shard``, or one picked with ``rng``) and wait until it is
    gone; returns its shard index. Raises if the process outlives the kill by 30 s."""
    backend = table._backend
    shard = int(rng.integers(table.num_shards)) if shard is None else shard
    pid = backend.placements[shard]["pid"]
    os.kill(pid, signal.SIGKILL)
    if not wait_for_exit(pid, 30):
        raise RuntimeError(f"shard {shard}'s process {pid} outlived SIGKILL by 30 s")
    return shard


@contextlib.contextmanager
def kill_after_send(
    table: sp.ShardedPageTable, rng: np.random.Generator | None, shard: int | None = None
):
    """Within the block, the first commit kills a shard (``shard``, or one of the shards it
    touches picked with ``rng``) once every touched shard's batch is on its way and before any answer is read (it wraps
    the backend's ``send`` of this table). The victim is stopped (SIGSTOP) before the
    batches go out, so it never answers that epoch: the commit always sees it lost, however
    fast the other shards are (also a pipelined one, whose ``wait`` then raises)."""
    backend = table._backend
    send = backend.send

    def send_then_kill(batches):
        nonlocal shard
        del backend.send  # back to the class's method: one kill only
        if shard is None:  # one the epoch touches (the others are not waited on)
            touched = [b.shard for b in batches]
            shard = int(touched[rng.integers(len(touched))])
        os.kill(backend.placements[shard]["pid"], signal.SIGSTOP)
        send(batches)
        _kill(table, rng, shard)

    backend.send = send_then_kill
    try:
        yield
    finally:
        backend.__dict__.pop("send", None)


def run_chaos(config: ChaosConfig, progress=None) -> ChaosReport:
    """Run the soak on a local Ray (started by the caller or here) and report."""
    rng = np.random.default_rng(config.seed)
    kill_steps = rng.choice(config.steps, size=config.kills, replace=False)
    in_commit = set(kill_steps[: config.in_commit].tolist())
    between = set(kill_steps[config.in_commit :].tolist())
    table = sp.ShardedPageTable(
        config.max_num_reqs,
        config.max_model_len,
        config.max_num_batched_tokens,
        config.page_sizes,
        num_shards=config.num_shards,
        backend="ray",
        recover="auto",
        max_recoveries=config.max_recoveries,
        ray={
            "devices_per_shard": config.devices_per_shard,
            "timeout_s": config.timeout_s,
            "standby": config.standby,
            "survivable": config.survivable,
        },
    )
    replay = sp.MultiGroupPageTable(
        config.max_num_reqs,
        config.max_model_len,
        config.max_num_batched_tokens,
        config.page_sizes,
        warmup=False,
    )
    workload = ServingWorkload(
        WorkloadConfig(
            seed=config.seed,
            arrivals_per_step=2.0,
            prompt_len=(8, config.max_model_len // 4),
            output_len=(4, config.max_model_len // 8),
            token_budget=config.max_num_batched_tokens,
        ),
        config.max_num_reqs,
        config.max_model_len,
        config.page_sizes,
    )
    report = ChaosReport()
    try:
        for step in range(config.steps):
            st = workload.step()
            apply_ops(table, st.ops)
            apply_ops(replay, st.ops)
            if step in between:
                _kill(table, rng)
                report.kills += 1
            before = len(table.recoveries)
            pids = [where["pid"] for where in table._backend.placements]
            if step in in_commit:
                with kill_after_send(table, rng):
                    table.commit(st.num_reqs)
            else:
                table.commit(st.num_reqs)
            replay.commit(st.num_reqs)
            if step in in_commit:
                report.kills += 1
                report.kills_in_commit += 1
            report.recovery_s += table.recoveries[before:]
            if len(table.recoveries) > before:
                now = [where["pid"] for where in table._backend.placements]
                replaced = sum(a != b for a, b in zip(pids, now, strict=True))
                report.shards_replaced += replaced
                report.kv_rows_lost += int(table.lost_kv_rows.size)
            _check(table, replay, report)
            report.steps += 1
            if progress is not None:
                progress(report)
        table.commit(config.max_num_reqs)
        replay.commit(config.max_num_reqs)
        _check(table, replay, report)
        report.recoveries = len(table.recoveries)
    finally:
        table.close()
    return report


def _check(table: sp.ShardedPageTable, replay: sp.MultiGroupPageTable, report: ChaosReport):
    # Each shard must hold exactly what the mirror published for it: the epoch that last
    # touched it (shards an epoch did not touch keep an older one) and that checksum.
    status = table.shard_status()  # a read: it may find a dead shard and recover first
    if status != [table._committer.holds(s) for s in range(table.num_shards)]:
        report.mixed_epoch_arrays += 1
    for g in range(len(replay)):
        want = np.asarray(replay[g].get_device_tensor())
        got = table.device_snapshot(g)
        report.rows_lost += int((got != want).any(axis=1).sum())
        if not (
            np.array_equal(table[g].get_cpu_tensor(), replay[g].get_cpu_tensor())
            and np.array_equal(table[g].num_pages_per_row, replay[g].num_pages_per_row)
        ):
            report.mirror_mismatches += 1
