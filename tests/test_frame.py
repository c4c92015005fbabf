"""The compiled frame path (``shard/frame.py``) against the code it stands in for.

* ``scan``: on any bytes, None or exactly what the strict decoder decodes; never accepts a
  message the strict decoder refuses.
* ``apply_groups``: the same tables, counts, terms, checksum change, undo and changed cells
  as ``kernels.apply_batch`` on each group; the packed device update holds exactly the
  changed cells of each block, at their new values.
* ``apply_frame``: applies only a canonical next-epoch frame for this shard from the
  coordinator it obeys whose APPENDs fit; any other frame leaves every array untouched, and
  ``Shard.apply`` answers it as before.
* devices: after frames (packed path) and big batches (per-group path) the device buffers
  hold the host rows; buffers handed out before a commit are donated by it, never changed.
* the ack built with ``struct`` reads back as msgpack's; odd values take msgpack's path.
* every compiled function of ``frame.py`` calls compiled code of that file only (numba's
  cache would not notice a change to another file's kernel).
"""

from __future__ import annotations

import dataclasses
import inspect

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_wire import (
    SETTINGS,
    assert_batches_equal,
    assert_consistent,
    assert_same_state,
    batch_st,
    limits_st,
    make_shard,
    mutate,
    mutation,
    pack,
    seed_message,
    state,
)

from sharded_pagetable.errors import WireFormatError
from sharded_pagetable.rows import kernels
from sharded_pagetable.rows.checksum import GroupConsts
from sharded_pagetable.rows.messages import OP_APPEND, OP_SET, Ack, GroupBatch, ShardBatch
from sharded_pagetable.shard import frame, wire
from sharded_pagetable.shard import shard as shard_mod
from sharded_pagetable.shard.wire import VERSION, WireLimits, decode, encode, encode_reply

# --------------------------------------------------------------------------- scan


def strict(data: bytes, limits: WireLimits) -> ShardBatch | None:
    try:
        return wire._decode_strict(data, limits)
    except WireFormatError:
        return None


def check_scan(data: bytes, limits: WireLimits) -> bool:
    """``scan`` agrees with the strict decoder on ``data``; whether it accepted it."""
    got = frame.scan(data, VERSION, limits.num_rows, limits.width_array)
    want = strict(data, limits)
    if got is None:
        return False
    assert want is not None, "the scan accepted a message the strict decoder refuses"
    fast = wire.batch_of(*got)
    assert_batches_equal(fast, want)
    assert (fast.generation, fast.touched, fast.kv_copies) == (want.generation, want.touched, ())
    assert (fast.schedule is None) == (want.schedule is None)
    if want.schedule is not None:
        np.testing.assert_array_equal(fast.schedule.sched, want.schedule.sched)
        np.testing.assert_array_equal(fast.schedule.done, want.schedule.done)
    assert not want.kv_copies
    return True


@st.composite
def full_batch_st(draw) -> tuple[WireLimits, ShardBatch]:
    """Any valid batch, with a generation, a schedule, KV copies and ``touched`` or not."""
    limits = draw(limits_st())
    batch = draw(batch_st(limits))
    n = limits.num_rows
    extra = {}
    if draw(st.booleans()):
        extra["generation"] = draw(st.one_of(st.integers(0, 9), st.integers(0, 2**64 - 1)))
    if draw(st.booleans()):
        cols = [draw(st.lists(st.integers(0, 2**30), min_size=n, max_size=n)) for _ in "sd"]
        extra["schedule"] = wire.Schedule(*(np.array(c, np.int32) for c in cols))
    if draw(st.booleans()):
        extra["touched"] = draw(st.integers(0, 2**31 - 1))
    if draw(st.integers(0, 4)) == 0:
        extra["kv_copies"] = tuple(
            np.array([[1], [2 + g]], np.int32) for g in range(len(limits.widths))
        )
    return limits, dataclasses.replace(batch, **extra)


@SETTINGS
@given(full_batch_st())
def test_scan_reads_what_encode_writes(lb: tuple[WireLimits, ShardBatch]) -> None:
    limits, batch = lb
    accepted = check_scan(encode(batch), limits)
    assert accepted == (not batch.kv_copies)  # KV copies: the strict decoder's business


@SETTINGS
@given(st.data(), st.lists(mutation, min_size=1, max_size=6))
def test_scan_agrees_on_mutated_messages(data: st.DataObject, mutations: list[tuple]) -> None:
    limits, batch = data.draw(full_batch_st())
    donor = encode(data.draw(batch_st(limits)))
    check_scan(mutate(encode(batch), donor, mutations), limits)


@SETTINGS
@given(limits_st(), st.binary(max_size=512))
def test_scan_agrees_on_arbitrary_bytes(limits: WireLimits, data: bytes) -> None:
    check_scan(data, limits)


def test_scan_steps_aside_for_other_encodings() -> None:
    """Valid messages in another layout than encode's go to the strict decoder."""
    limits = WireLimits(4, (4, 2))
    batch = ShardBatch(7, 6, 1, (GroupBatch.empty(), GroupBatch.empty()), 5)
    msg = msgpack.unpackb(encode(batch))
    reordered = {"groups": msg.pop("groups"), **msg}
    signed = pack(msg | {"groups": reordered["groups"]}).replace(
        b"\xa5epoch\x07", b"\xa5epoch\xd0\x07"
    )
    for data in (pack(reordered), signed):
        assert frame.scan(data, VERSION, 4, limits.width_array) is None
        assert decode(data, limits).epoch == 7
    # the same values, canonical: accepted
    assert frame.scan(encode(batch), VERSION, 4, limits.width_array) is not None


def test_scan_refuses_what_the_strict_decoder_refuses() -> None:
    limits = WireLimits(4, (4, 2))
    good = msgpack.unpackb(encode(ShardBatch(2, 1, 0, (GroupBatch.empty(),) * 2)))
    bad = [
        good | {"v": VERSION + 1},
        good | {"epoch": 1},  # not after its base
        good | {"epoch": 2**63},
        good | {"shard": 2**31},
        good | {"touched": 2**31},
        {k: v for k, v in good.items() if k != "base"},
        good | {"sched": b"\0" * 16},  # without done
        good | {"groups": good["groups"][:1]},
    ]
    for msg in bad:
        data = pack(msg)
        assert frame.scan(data, VERSION, 4, limits.width_array) is None
        with pytest.raises(WireFormatError):
            decode(data, limits)
    assert frame.scan(b"\x85" + pack(good)[1:] + b"\x00", VERSION, 4, limits.width_array) is None


# --------------------------------------------------------------------------- apply_groups


@st.composite
def state_and_batch(draw):
    """Groups holding a first batch, and a second batch that fits them; blocks of rows."""
    limits = draw(limits_st())
    n = limits.num_rows
    tables = [np.zeros((n, w), np.int32) for w in limits.widths]
    counts = [np.zeros(n, np.int32) for _ in limits.widths]
    first = draw(batch_st(limits, counts=counts, epoch=1, base=0, shard=0))
    for g, gb in enumerate(first.groups):
        kernels.apply_batch_fresh(
            tables[g],
            counts[g],
            np.zeros(n, np.uint64),
            gb,
            GroupConsts.build(g, tables[g].shape[1], n),
        )
    second = draw(batch_st(limits, counts=counts, epoch=2, base=1, shard=0))
    block_rows = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    buckets = np.array(draw(st.sampled_from([(1, 4, 64), (64,), (2,)])), np.int64)
    return limits, tables, counts, second, (block_rows, n // block_rows, buckets)


@SETTINGS
@given(state_and_batch(), st.integers(0, 40))
def test_apply_groups_is_apply_batch_on_every_group(got, lo: int) -> None:
    limits, tables, counts, batch, blocks = got
    n = limits.num_rows
    consts = [GroupConsts.build(g, w, n + lo, lo) for g, w in enumerate(limits.widths)]
    inner = [np.zeros(n, np.uint64) for _ in limits.widths]
    for g, t in enumerate(tables):  # the terms of what the tables hold
        kernels.apply_batch_fresh(
            t.copy(), np.zeros(n, np.int32), inner[g], *_full(t, counts[g]), consts[g]
        )
    ref = [(t.copy(), c.copy(), i.copy()) for t, c, i in zip(tables, counts, inner, strict=True)]
    mine = [(t.copy(), c.copy(), i.copy()) for t, c, i in ref]
    cols, offs = frame.flat_columns(batch.groups)
    applied = frame.apply_groups(
        *(tuple(x[k] for x in mine) for k in range(3)), frame.Consts.of(consts), cols, offs, blocks
    )
    assert applied.bad is None
    total, first = 0, 0
    for g, gb in enumerate(batch.groups):
        delta, cells, before = kernels.apply_batch(*ref[g], gb, consts[g], lo)
        total = (total + delta) % 2**64
        for x, y in zip(ref[g], mine[g], strict=True):
            np.testing.assert_array_equal(x, y)
        mine_before = applied.before(g, first, gb.size, limits.widths[g])
        for f in ("counts", "inner", "replaced", "old_rows"):
            np.testing.assert_array_equal(getattr(mine_before, f), getattr(before, f), f)
        for x, y in zip(applied.cells(gb, first, lo), cells, strict=True):
            np.testing.assert_array_equal(x, y)
        first += gb.size
    assert applied.delta == total
    check_packed(applied, batch, [m[0] for m in mine], blocks, lo)


def _full(table: np.ndarray, counts: np.ndarray) -> tuple[GroupBatch]:
    return (ShardBatch.full_state(1, 0, [table], [counts]).groups[0],)


def check_packed(applied, batch: ShardBatch, tables, blocks, lo: int) -> None:
    """The packed update holds every changed cell once, in its block, at its new value."""
    block_rows, num_blocks, buckets = blocks
    n_groups = len(tables)
    per_block = np.zeros((num_blocks, n_groups), np.int64)
    first = 0
    for g, gb in enumerate(batch.groups):
        rows, _ = applied.cells(gb, first, lo)
        np.add.at(per_block[:, g], (rows - lo) // block_rows, 1)
        first += gb.size
    if per_block.max(initial=0) > buckets[-1]:
        assert applied.packed.size == 0
        return
    k = (applied.packed.shape[1] - n_groups) // (3 * n_groups)
    assert k == min(b for b in buckets if b >= per_block.max(initial=0))
    assert applied.touched.tolist() == np.flatnonzero(per_block.sum(1)).tolist()
    first = 0
    for g, gb in enumerate(batch.groups):
        rows, cols = applied.cells(gb, first, lo)
        first += gb.size
        want = set(zip((rows - lo).tolist(), cols.tolist(), strict=True))
        got = set()
        for b in range(num_blocks):
            p = applied.packed[b]
            assert p[g] == per_block[b, g]
            base = n_groups + 3 * g * k
            r = p[base : base + p[g]] + b * block_rows
            c = p[base + k : base + k + p[g]]
            np.testing.assert_array_equal(p[base + 2 * k : base + 2 * k + p[g]], tables[g][r, c])
            got |= set(zip(r.tolist(), c.tolist(), strict=True))
        assert got == want


def test_apply_groups_refuses_a_bad_append_without_writing() -> None:
    n, widths = 4, (4, 2)
    tables = tuple(np.zeros((n, w), np.int32) for w in widths)
    counts = (np.array([2, 0, 0, 0], np.int32), np.zeros(n, np.int32))
    inner = tuple(np.zeros(n, np.uint64) for _ in widths)
    before = [x.copy() for x in (*tables, *counts, *inner)]
    good = GroupBatch(*(np.array(x, np.int32) for x in ([OP_SET], [1], [0], [1], [5])))
    bad = GroupBatch(*(np.array(x, np.int32) for x in ([OP_APPEND], [0], [1], [2], [6])))
    consts = frame.Consts.of([GroupConsts.build(g, w, n) for g, w in enumerate(widths)])
    cols, offs = frame.flat_columns([good, bad])
    applied = frame.apply_groups(tables, counts, inner, consts, cols, offs, (2, 2, np.array([4])))
    assert applied.bad == (1, 0)
    for x, y in zip(before, (*tables, *counts, *inner), strict=True):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- apply_frame


def test_a_canonical_frame_takes_one_call(monkeypatch) -> None:
    shard = make_shard()
    message = encode(
        ShardBatch(1, 0, shard.spec.shard_id, (GroupBatch(*(np.array(x, np.int32) for x in (
            [OP_SET], [3], [0], [2], [7, 8]))), GroupBatch.empty()))
    )  # fmt: skip

    def no_general_path(*args):
        raise AssertionError("the general path decoded a canonical frame")

    monkeypatch.setattr(shard_mod, "decode_columns", no_general_path)
    ack = shard.apply(message)
    assert (ack.epoch, ack.rows, ack.applied) == (1, 1, True)
    assert shard.tables[0][3, :3].tolist() == [7, 8, 0]
    assert_consistent(shard)


@SETTINGS
@given(st.data())
def test_frames_that_do_not_fit_change_nothing_in_the_one_call(data: st.DataObject) -> None:
    shard = make_shard()
    shard.apply(seed_message(shard, data))
    gen = shard.generation
    held = shard.epoch
    good = data.draw(
        batch_st(shard.limits, counts=shard.counts, epoch=held + 1, base=held, shard=1)
    )
    misfits = [
        dataclasses.replace(good, shard=2),  # another shard's
        dataclasses.replace(good, base=held + 1, epoch=held + 2),  # skips an epoch
        dataclasses.replace(good, epoch=held, base=held - 1),  # the epoch it holds
        dataclasses.replace(good, generation=gen + 1),  # a coordinator it does not obey
    ]
    bad_append = [i for i, gb in enumerate(good.groups) if (gb.op == OP_APPEND).any()]
    if bad_append:
        g = bad_append[0]
        gb = good.groups[g]
        start = gb.start.copy()
        start[np.flatnonzero(gb.op == OP_APPEND)[0]] += 1
        if (start < gb.count).all():
            groups = list(good.groups)
            groups[g] = dataclasses.replace(gb, start=start, pages=gb.pages[1:])
            misfits.append(dataclasses.replace(good, groups=tuple(groups)))
    consts = shard._consts_of()
    arrays = (tuple(shard.tables), tuple(shard.counts), tuple(shard.inner))
    for batch in misfits:
        before = state(shard)
        got = frame.apply_frame(
            encode(batch), VERSION, shard.limits, shard.spec.shard_id, held, gen, True, arrays,
            consts, shard.devices[0].packing,
        )  # fmt: skip
        assert got is None
        assert_same_state(before, state(shard))
    got = frame.apply_frame(
        encode(good), VERSION, shard.limits, 1, held, gen, True, arrays, consts,
        shard.devices[0].packing,
    )  # fmt: skip
    assert got is not None and got.epoch == held + 1


def test_a_schedule_for_a_shard_without_step_inputs_is_refused_unchanged() -> None:
    shard = make_shard()
    assert shard.step is None
    n = shard.limits.num_rows
    sched = wire.Schedule(np.ones(n, np.int32), np.zeros(n, np.int32))
    message = encode(ShardBatch(1, 0, 1, (GroupBatch.empty(),) * 2, 0, sched))
    before = state(shard)
    with pytest.raises(WireFormatError, match="without step inputs"):
        shard.apply(message)
    assert_same_state(before, state(shard))


# --------------------------------------------------------------------------- devices


@SETTINGS
@given(st.data())
def test_devices_hold_the_rows_and_old_buffers_are_donated(data: st.DataObject) -> None:
    shard = make_shard()
    for _ in range(4):
        handed_out = [b for g in range(len(shard.tables)) for b in shard.buffers(g)]
        values = [np.asarray(b).copy() for b in handed_out]
        shard.apply(seed_message(shard, data))
        assert_consistent(shard)  # snapshot == host rows, checksum from scratch
        now = [x for g in range(len(shard.tables)) for x in shard.buffers(g)]
        for b, v in zip(handed_out, values, strict=True):
            # never changed under a reader: donated (deleted), or the same untouched buffer
            assert b.is_deleted() or (any(b is x for x in now) and (np.asarray(b) == v).all())


def test_a_block_over_the_largest_bucket_takes_the_per_group_path() -> None:
    from sharded_pagetable.rows import device

    layout = shard_mod.ShardLayout(64, num_shards=1, num_blocks=2)
    widths = (device.CELL_BUCKETS[-1] // 8,)  # 32 rows x 512 = 16384 cells per block
    shard = shard_mod.Shard(
        shard_mod.ShardSpec(0, layout, widths, warmup=False), make_shard().sharding
    )
    rows = np.arange(32, dtype=np.int32)
    full = GroupBatch(
        np.full(32, OP_SET, np.int32), rows, np.zeros(32, np.int32),
        np.full(32, widths[0], np.int32), np.arange(32 * widths[0], dtype=np.int32) + 1,
    )  # fmt: skip
    shard.apply(encode(ShardBatch(1, 0, 0, (full,))))
    np.testing.assert_array_equal(shard.snapshot(0), shard.tables[0])
    assert shard.tables[0][:32].min() > 0 and not shard.tables[0][32:].any()


# --------------------------------------------------------------------------- acks


@pytest.mark.parametrize(
    "ack",
    [
        Ack(0, 1, 0, 0, True),
        Ack(3, 2**63 - 1, 2**64 - 1, 2**31 - 1, False, 2**64 - 1, 2**63 - 1),
        Ack(1, 5, 123, 25, True, 7 << 32, 812),
    ],
)
def test_struct_ack_reads_as_msgpack_ack(ack: Ack) -> None:
    data = encode_reply(ack)
    assert wire.decode_reply(data, 4) == ack
    body = [ack.shard, ack.epoch, ack.checksum, ack.rows, ack.applied, ack.generation, ack.apply_us]
    assert msgpack.unpackb(data) == msgpack.unpackb(msgpack.packb({"v": VERSION, "ack": body}))


def test_odd_ack_values_take_msgpacks_path() -> None:
    negative = Ack(0, 1, 0, 0, True, 0, -1)  # out of u64: msgpack's own (signed) form
    assert encode_reply(negative) == msgpack.packb({"v": VERSION, "ack": [0, 1, 0, 0, True, 0, -1]})
    with pytest.raises(TypeError):  # as before: msgpack refuses a numpy int
        encode_reply(Ack(0, np.int64(1), 0, 0, True))
    as_int = encode_reply(Ack(0, 1, 0, 0, 1))  # applied given as an int: msgpack's int
    assert as_int == msgpack.packb({"v": VERSION, "ack": [0, 1, 0, 0, 1, 0, 0]})


# --------------------------------------------------------------------------- numba's cache


def test_compiled_code_of_frame_calls_only_its_own_file() -> None:
    for module in (frame, kernels):
        jitted = {n for n, f in vars(module).items() if hasattr(f, "py_func")}
        for name in jitted:
            fn = getattr(module, name)
            for ref in fn.py_func.__code__.co_names:
                target = fn.py_func.__globals__.get(ref)
                if hasattr(target, "py_func"):
                    assert inspect.getmodule(target.py_func) is module, (name, ref)


# --------------------------------------------------------------------------- the benchmark


def test_bench_frame_quick(tmp_path) -> None:
    """``scripts/bench_frame.py --quick``: both versions take the same frames, end equal."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    python = root / ".venv" / "bin" / "python"
    out = tmp_path / "frame.json"
    proc = subprocess.run(
        [str(python if python.exists() else sys.executable), "scripts/bench_frame.py",
         "--quick", "--json", str(out)],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "whole frame (no probes)" in proc.stdout and "target: a shard frame" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["whole"]["new_cpu"] > 0 and doc["whole"]["base_cpu"] > 0
