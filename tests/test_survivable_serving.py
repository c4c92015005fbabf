"""Survivable shards under a real model step: a killed shard costs only its own rows' KV.

Four survivable Ray shards serve requests with ``serve_step`` (KV copies, K/V writes and
paged attention in the shard processes). A shard is killed while a KV migration it is the
source of is pending, then one it is the target of, then in the middle of a model step
that moves pages out of it. After each recovery: the survivors kept their processes; the
rows whose KV is reported lost are exactly the victim's live rows plus the rows whose
pages were still to come from the victim's pool; and after the scheduler prefills those
rows again (and only those), every scheduled token's attention equals dense attention
recomputed from the request's own K/V, so the survivors' KV came through intact.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import sharded_pagetable as sp
from sharded_pagetable.serving.runner import AttentionConfig, drop_cache, max_error, serve_step
from sharded_pagetable.testing.chaos import kill_after_send, wait_for_exit

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.chaos]

ROWS, MAX_LEN, PAGE_SIZES, BUDGET, POOL, SHARDS = 16, 128, (8, 16), 256, 48, 4
RPS = ROWS // SHARDS
TOL = 1e-4


class Scheduler:
    """A minimal scheduler over the table: requests in rows, pages from each shard's pool,
    a prefill of the whole context for a new (or re-admitted) request, then one token per
    step. ``done[row]`` counts the tokens whose K/V the shards hold."""

    def __init__(self, table: sp.ShardedPageTable) -> None:
        self.t = table
        self.uid = np.full(ROWS, -1, np.int32)
        self.done = np.zeros(ROWS, np.int32)
        self.want = np.zeros(ROWS, np.int32)  # tokens the next step must have computed
        self.pages: dict[int, list[list[int]]] = {}
        self.free = {s: list(range(s * POOL, (s + 1) * POOL)) for s in range(SHARDS)}
        self.pending_free: list[tuple[int, list[int]]] = []

    def _take(self, shard: int, n: int) -> list[int]:
        out, self.free[shard] = self.free[shard][:n], self.free[shard][n:]
        assert len(out) == n, "pool exhausted"
        return out

    def _grow(self, row: int, tokens: int) -> None:
        shard = row // RPS
        extra = []
        for g, size in enumerate(PAGE_SIZES):
            need = -(-tokens // size) - len(self.pages[row][g])
            extra.append(self._take(shard, max(need, 0)))
        if any(extra):
            self.t.append_row(extra, row)
            for g in range(len(PAGE_SIZES)):
                self.pages[row][g] += extra[g]

    def admit(self, row: int, uid: int, prompt: int) -> None:
        self.uid[row], self.done[row], self.want[row] = uid, 0, prompt
        self.pages[row] = [[] for _ in PAGE_SIZES]
        self.t.add_row([[] for _ in PAGE_SIZES], row)
        self._grow(row, prompt)

    def migrate(self, src: int, tgt: int) -> None:
        """Move a request to a free row of another shard: fresh pages in the target pool,
        its KV copied by the next model step; the old pages go back once that ran."""
        shard = tgt // RPS
        new = [self._take(shard, len(p)) for p in self.pages[src]]
        self.t.move_row(src, tgt, page_ids=new)
        self.t.clear_row(src)
        self.pending_free.append((src // RPS, [p for g in self.pages[src] for p in g]))
        self.uid[tgt], self.done[tgt], self.want[tgt] = (
            self.uid[src],
            self.done[src],
            self.want[src],
        )
        self.pages[tgt] = new
        self.uid[src], self.done[src], self.want[src] = -1, 0, 0
        del self.pages[src]

    def readmit(self, rows) -> None:
        """The KV of ``rows`` is lost: give them fresh pages and prefill all they had."""
        for row in np.asarray(rows).tolist():
            shard = row // RPS
            for g in self.pages[row]:
                self.free[shard] += g
            self.t.clear_row(row)
            uid, tokens = int(self.uid[row]), int(self.want[row])
            self.admit(row, uid, tokens)

    def decode(self) -> None:
        """Every live row that is up to date asks for one more token."""
        for row in np.flatnonzero(self.uid >= 0).tolist():
            if self.done[row] == self.want[row]:
                self.want[row] += 1
                self._grow(row, int(self.want[row]))

    def commit(self):
        sched = np.where(self.uid >= 0, self.want - self.done, 0).astype(np.int32)
        return self.t.commit(ROWS, num_scheduled_tokens=sched, num_computed_tokens=self.done)

    def served(self) -> None:
        self.done = self.want.copy()
        self.done[self.uid < 0] = 0
        for shard, pages in self.pending_free:  # the copies that read them have run
            self.free[shard] += pages
        self.pending_free = []


CFG = AttentionConfig("survivable", PAGE_SIZES, SHARDS, POOL)


def serve(t: sp.ShardedPageTable, sch: Scheduler, fn=serve_step) -> int:
    results = t.run_on_shards(fn, CFG, sch.uid.copy(), step=True)
    checked, err = max_error(CFG, results, sch.uid)
    assert err < TOL, f"attention differs from dense by {err}"
    sch.served()
    return checked


def pids(t: sp.ShardedPageTable) -> list[int]:
    return [where["pid"] for where in t._backend.placements]


def live_rows_of(sch: Scheduler, shard: int) -> set[int]:
    return {r for r in range(shard * RPS, (shard + 1) * RPS) if sch.uid[r] >= 0}


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    assert wait_for_exit(pid, 20), f"process {pid} outlived SIGKILL"


def recover_and_check(t, sch, before, victim, also_lost: set[int]) -> None:
    t.recover()
    after = pids(t)
    for s in range(SHARDS):
        assert (after[s] == before[s]) == (s != victim), (s, before, after)
    want = live_rows_of(sch, victim) | also_lost
    assert set(t.lost_kv_rows.tolist()) == want
    assert_devices_match_mirror(t)
    sch.readmit(t.lost_kv_rows)


def assert_devices_match_mirror(t: sp.ShardedPageTable) -> None:
    """What the shards' devices hold is what the mirror published (no pending row ops)."""
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(t.device_snapshot(g), t[g].get_cpu_tensor())


@pytest.fixture(scope="module")
def table(local_ray):
    t = sp.ShardedPageTable(
        ROWS,
        MAX_LEN,
        BUDGET,
        PAGE_SIZES,
        num_shards=SHARDS,
        pages_per_shard=POOL,
        backend="ray",
        warmup=False,
        ray={"devices_per_shard": 1, "timeout_s": 20, "survivable": True},
    )
    yield t
    try:
        t.run_on_shards(lambda arrays, name: drop_cache(name), CFG.name)
    finally:
        t.close()


def test_a_dead_shard_costs_only_its_rows_kv_under_a_model_step(table):
    t = table
    sch = Scheduler(t)
    for s in range(SHARDS):
        sch.admit(s * RPS, 10 * s + 1, 5 + 3 * s)
        sch.admit(s * RPS + 1, 10 * s + 2, 11 + s)
    sch.commit()
    checked = serve(t, sch)
    for _ in range(3):
        sch.decode()
        sch.commit()
        checked += serve(t, sch)

    def kill_while_migrating(src: int, tgt: int, victim: int, also_lost: set[int]) -> int:
        """Move ``src`` to ``tgt``, commit, kill ``victim`` before the model step that owes
        the copy, recover and serve again; returns the tokens checked."""
        sch.migrate(src, tgt)
        sch.decode()
        sch.commit()
        before = pids(t)
        kill(before[victim])
        with pytest.raises(sp.ShardFailedError):
            serve(t, sch)
        recover_and_check(t, sch, before, victim, also_lost)
        sch.commit()
        return serve(t, sch)

    # 1. Shard 1 dies while the KV of a row that left it is still to be copied.
    checked += kill_while_migrating(1 * RPS + 0, 2 * RPS + 2, 1, {2 * RPS + 2})
    # 2. Shard 3 dies while a row moving into it waits for its KV.
    checked += kill_while_migrating(0 * RPS + 1, 3 * RPS + 3, 3, set())

    # 3. Shard 2 dies inside the model step that copies a row's KV out of it.
    sch.migrate(2 * RPS + 0, 0 * RPS + 2)
    sch.decode()
    sch.commit()
    before = pids(t)
    victim = 2

    def slow_on_victim(arrays, step, cfg, uids, victim_pid):
        import os
        import time

        if os.getpid() == victim_pid:
            time.sleep(30)  # killed in here
        return serve_step(arrays, step, cfg, uids)

    killer = threading.Timer(1.5, kill, args=(before[victim],))
    killer.start()
    t0 = time.perf_counter()
    with pytest.raises(sp.ShardFailedError):
        t.run_on_shards(slow_on_victim, CFG, sch.uid.copy(), before[victim], step=True)
    killer.join()
    assert time.perf_counter() - t0 < 15, "the survivors waited out their deadline"
    recover_and_check(t, sch, before, victim, {0 * RPS + 2})
    sch.commit()
    checked += serve(t, sch)

    # 4. Shard 0 dies inside a pipelined commit (sent, not acked) that migrates a row out.
    sch.migrate(0 * RPS + 0, 1 * RPS + 3)
    sch.decode()
    before = pids(t)
    sched = np.where(sch.uid >= 0, sch.want - sch.done, 0).astype(np.int32)
    with kill_after_send(t, None, shard=0):
        flying = t.commit(
            ROWS, num_scheduled_tokens=sched, num_computed_tokens=sch.done, wait=False
        )
    assert not flying.confirmed and 0 in [r.shard for r in flying.shards]  # it reaches shard 0
    with pytest.raises(sp.ShardFailedError):
        t.wait()
    # Nothing was published (the move stays pending): the rows lost are the victim's as
    # last published, the row that was leaving it among them.
    published = {r for r in range(0, RPS) if sch.uid[r] >= 0} | {0 * RPS + 0}
    t.recover()
    after = pids(t)
    assert [a == b for a, b in zip(before, after, strict=True)] == [False, True, True, True]
    assert set(t.lost_kv_rows.tolist()) == published
    # The migrated request's KV died with its source: recompute it in its new row, and the
    # rest of shard 0's requests in theirs.
    sch.readmit([r for r in published if r != 0 * RPS + 0] + [1 * RPS + 3])
    sch.commit()
    checked += serve(t, sch)

    for _ in range(2):  # and it goes on
        sch.decode()
        sch.commit()
        checked += serve(t, sch)
    assert_devices_match_mirror(t)
    assert checked > 100
    assert len(t.recoveries) == 4
