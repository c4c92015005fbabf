"""Recovery of the Ray backend: manual recover, idempotent re-sends, and a restarted
coordinator attaching to detached shards (checked against the independent reference model)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from reference_model import ReferenceModel

import sharded_pagetable as sp
from sharded_pagetable.config import TableConfig
from sharded_pagetable.rows.messages import OP_APPEND, GroupBatch, ShardBatch
from sharded_pagetable.serving.workload import ServingWorkload, WorkloadConfig, apply_ops
from sharded_pagetable.shard.wire import decode_reply, encode

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess]

ROWS, MAX_LEN, PAGE_SIZES, BUDGET = 32, 1024, (16, 64), 256
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name: str, **ray_opts) -> TableConfig:
    return TableConfig.from_dict(
        {
            "max_num_reqs": ROWS,
            "max_model_len": MAX_LEN,
            "max_num_batched_tokens": BUDGET,
            "page_sizes": list(PAGE_SIZES),
            "num_shards": 2,
            "backend": "ray",
            "ray": {
                "devices_per_shard": 2,
                "timeout_s": 30,
                "namespace": "spt_recovery_tests",
                "name": name,
                **ray_opts,
            },
        }
    )


def workload(seed: int) -> ServingWorkload:
    wl = WorkloadConfig(
        seed=seed, arrivals_per_step=2, prompt_len=(8, 200), output_len=(4, 60), token_budget=BUDGET
    )
    return ServingWorkload(wl, ROWS, MAX_LEN, PAGE_SIZES)


def model() -> ReferenceModel:
    return ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)


def append_page_message(
    epoch: int, held: int, page: int, generation: int, touched: int = 2
) -> bytes:
    """Shard 0's wire message for ``epoch + 1`` from coordinator ``generation``: append
    ``page`` to its local row 0 (holding ``held`` pages) in group 0, nothing in group 1; the
    epoch was sent to ``touched`` shards."""
    append = GroupBatch(*(np.array([v], np.int32) for v in (OP_APPEND, 0, held, held + 1, page)))
    empty = GroupBatch(*(np.empty(0, np.int32) for _ in range(5)))
    return encode(ShardBatch(epoch + 1, epoch, 0, (append, empty), generation, touched=touched))


def assert_published(table: sp.ShardedPageTable, ref: ReferenceModel) -> None:
    """Mirror and device snapshots equal the model's published tables."""
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(table[g].get_cpu_tensor(), ref.device_array(g))
        np.testing.assert_array_equal(table[g].num_pages_per_row, ref.device_counts_array(g))
        np.testing.assert_array_equal(table.device_snapshot(g), ref.device_array(g))


def assert_same(table: sp.ShardedPageTable, ref: ReferenceModel) -> None:
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(table[g].get_cpu_tensor(), ref.host_array(g))
        np.testing.assert_array_equal(table[g].num_pages_per_row, ref.counts_array(g))
        np.testing.assert_array_equal(table.device_snapshot(g), ref.device_array(g))


def test_dead_shard_with_manual_recover(local_ray):
    t = sp.ShardedPageTable.from_config(config("manual"))
    ref = model()
    try:
        wl = workload(3)
        for _ in range(8):
            step = wl.step()
            for tab in (t, ref):
                apply_ops(tab, step.ops)
                tab.commit(step.num_reqs)
        step = wl.step()
        apply_ops(t, step.ops)
        apply_ops(ref, step.ops)
        victim = t.stage(step.num_reqs).messages[-1].shard  # one the commit reaches
        os.kill(t._backend.placements[victim]["pid"], signal.SIGKILL)
        with pytest.raises(sp.ShardFailedError, match=r"shard \d") as info:
            t.commit(step.num_reqs)
        assert info.value.epoch == t.epoch + 1
        with pytest.raises(sp.ShardFailedError, match="fail-closed"):
            t.commit(step.num_reqs)
        seconds = t.recover()
        assert seconds > 0 and len(t.recoveries) == 1
        # Recovered at the last published epoch; the pending step is still pending.
        for g in range(len(PAGE_SIZES)):
            np.testing.assert_array_equal(t.device_snapshot(g), ref.device_array(g))
        assert t.shard_status()[victim][0] == t.epoch
        t.commit(step.num_reqs)
        ref.commit(step.num_reqs)
        assert_same(t, ref)
    finally:
        t.close()


def test_resent_epoch_is_acknowledged_not_applied_twice(local_ray):
    t = sp.ShardedPageTable.from_config(config("resend"))
    try:
        t.add_row([[1, 2], [3]], 0)
        t.commit(ROWS)
        actor = t._backend.actors[0]
        epoch, checksum = t.shard_status()[0]
        message = append_page_message(epoch, held=2, page=9, generation=t.generation)
        first = decode_reply(ray.get(actor.apply.remote(message), timeout=30), 2)
        again = decode_reply(ray.get(actor.apply.remote(message), timeout=30), 2)
        assert first.applied and not again.applied
        assert (again.epoch, again.checksum) == (first.epoch, first.checksum)
        assert first.checksum != checksum
        assert ray.get(actor.snapshot.remote(0), timeout=30)[0, :4].tolist() == [1, 2, 9, 0]
    finally:
        t.close()


def shard_0_one_epoch_ahead(name: str, touched: int):
    """A detached table of config ``name`` at one epoch whose shard 0 then applied the next
    (sent to ``touched`` shards) and whose coordinator is gone before reading the ack:
    ``(config, reference at the first epoch, that epoch, shard 0's reply)``."""
    cfg = config(name, detached=True)
    t = sp.ShardedPageTable.from_config(cfg)
    ref = model()
    for tab in (t, ref):
        tab.add_row([[5, 6, 7], [8]], 0)
        tab.add_row([[9], [10, 11]], 20)
        tab.commit(ROWS)
    epoch = t.epoch
    message = append_page_message(epoch, held=3, page=99, generation=t.generation, touched=touched)
    reply = ray.get(t._backend.actors[0].apply.remote(message), timeout=30)
    t._backend.detach()  # the old coordinator is gone; its shards keep running
    return cfg, ref, epoch, reply


def test_attach_settles_shards_one_epoch_apart(local_ray):
    """The old coordinator died after shard 0 applied an epoch that shard 1 never got: the
    new coordinator steps shard 0 back and starts from the last epoch every shard holds."""
    cfg, ref, epoch, reply = shard_0_one_epoch_ahead("apart", touched=2)
    assert decode_reply(reply, 2).epoch == epoch + 1
    attached = sp.ShardedPageTable.attach(cfg)
    try:
        assert attached.epoch == epoch
        assert {e for e, _ in attached.shard_status()} == {epoch}
        assert_published(attached, ref)
        attached.append_row([[12], [13]], 0)
        ref.append_row([[12], [13]], 0)
        assert attached.commit(ROWS).epoch == epoch + 1
        ref.commit(ROWS)
        assert_same(attached, ref)
    finally:
        attached.close(stop_shards=True)


def test_attach_keeps_a_finished_epoch_that_reached_one_shard(local_ray):
    """The old coordinator's last epoch reached shard 0 alone (only its rows changed) and
    shard 0 applied it: the new coordinator keeps it, with shard 1 at its older epoch."""
    cfg, ref, epoch, reply = shard_0_one_epoch_ahead("one-shard", touched=1)
    assert reply
    ref.append_row([[99], []], 0)
    ref.commit(ROWS)
    attached = sp.ShardedPageTable.attach(cfg)
    try:
        assert attached.epoch == epoch + 1
        assert [e for e, _ in attached.shard_status()] == [epoch + 1, epoch]
        assert_published(attached, ref)
        for tab in (attached, ref):
            tab.append_row([[12], [13]], 20)
        assert [r.shard for r in attached.commit(ROWS).shards] == [1]
        ref.commit(ROWS)
        assert_same(attached, ref)
        assert [e for e, _ in attached.shard_status()] == [epoch + 1, epoch + 2]
    finally:
        attached.close(stop_shards=True)


COORDINATOR = """
import json, os, sys
sys.path.insert(0, {tests!r})
import sharded_pagetable as sp
from sharded_pagetable.config import TableConfig
from sharded_pagetable.serving.workload import apply_ops
from test_recovery import workload
cfg = TableConfig.from_dict(json.loads(sys.argv[1]))
t = sp.ShardedPageTable.from_config(cfg)
wl = workload(int(sys.argv[2]))
for _ in range(int(sys.argv[3])):
    step = wl.step()
    apply_ops(t, step.ops)
    t.commit(step.num_reqs)
print(json.dumps({{"epoch": t.epoch, "num_reqs": step.num_reqs}}), flush=True)
os._exit(0)  # the coordinator process dies without closing anything
"""


def test_restarted_coordinator_attaches_and_continues(local_ray):
    cfg = config("restart", detached=True)
    data = {**cfg.__dict__, "page_sizes": list(PAGE_SIZES)}
    data["ray"] = {**cfg.ray.__dict__, "address": local_ray}
    seed, before, after = 11, 25, 15
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            COORDINATOR.format(tests=os.path.join(REPO, "tests")),
            json.dumps(data),
            str(seed),
            str(before),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    crashed = json.loads(proc.stdout.strip().splitlines()[-1])
    # The restarted scheduler rebuilds its own state from the same request stream.
    ref, wl = model(), workload(seed)
    for _ in range(before):
        step = wl.step()
        apply_ops(ref, step.ops)
        ref.commit(step.num_reqs)
    t0 = time.perf_counter()
    t = sp.ShardedPageTable.attach(cfg)
    try:
        assert time.perf_counter() - t0 < 60
        assert t.epoch == crashed["epoch"] > 0
        assert_published(t, ref)
        # Changes the old coordinator never committed (rows it vacated past num_reqs) died
        # with it; the scheduler re-issues them, then carries on.
        for r in range(crashed["num_reqs"], ROWS):
            if any(ref.count(g, r) != len(ref.device[g][r]) for g in range(len(PAGE_SIZES))):
                t.clear_row(r)
        for _ in range(after):
            step = wl.step()
            for tab in (t, ref):
                apply_ops(tab, step.ops)
                tab.commit(step.num_reqs)
            assert_same(t, ref)
    finally:
        t.close(stop_shards=True)


def test_a_shard_holding_other_content_for_an_epoch_fails_the_table_closed(local_ray):
    """Shard 0 applied epoch E + 1 with content the coordinator never sent (a direct call on
    its actor). The coordinator's own E + 1 is refused: the table fails closed (reads stop
    serving the shard's content) and recover() rebuilds it from the mirror."""
    t = sp.ShardedPageTable.from_config(config("other-content"))
    ref = model()
    try:
        for tab in (t, ref):
            tab.add_row([[5, 6, 7], [8]], 0)
            tab.add_row([[9], [10, 11]], 20)
            tab.commit(ROWS)
        forged = append_page_message(t.epoch, held=3, page=99, generation=t.generation)
        ack = decode_reply(ray.get(t._backend.actors[0].apply.remote(forged), timeout=30), 2)
        assert ack.epoch == t.epoch + 1
        for tab in (t, ref):
            tab.append_row([[12], [13]], 0)
        with pytest.raises(sp.ShardFailedError, match="other content") as info:
            t.commit(ROWS)
        assert info.value.shard == 0
        with pytest.raises(sp.ShardFailedError, match="fail-closed"):
            t.device_snapshot(0)
        t.recover()
        assert 99 not in t.device_snapshot(0)
        t.commit(ROWS)
        ref.commit(ROWS)
        assert_same(t, ref)
    finally:
        t.close()
