"""Coordinator generations (issue 16, item 6): a counter in the high 32 bits, 32 random bits.

A shard takes only a u64 generation, never a lower one, and never one whose counter jumps
more than ``GENERATION_STEP`` past its own; ``new_generation`` never wraps. Checked on
``Shard`` objects directly; a refused fence leaves the shard exactly as it was.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from sharded_pagetable.constants import (
    GENERATION_STEP,
    MAX_FIRST_COUNTER,
    MAX_GENERATION,
    OP_APPEND,
    OP_SET,
)
from sharded_pagetable.coordinator.epochs import new_generation
from sharded_pagetable.errors import FencedError, WireFormatError
from sharded_pagetable.routing.layout import ShardLayout
from sharded_pagetable.routing.mesh import build_mesh, row_sharding
from sharded_pagetable.rows.messages import GroupBatch, ShardBatch
from sharded_pagetable.shard.shard import Shard, ShardSpec
from sharded_pagetable.shard.wire import decode_reply, encode_reply

LAYOUT = ShardLayout(64, num_shards=4, num_blocks=8)  # 16 rows per shard
WIDTHS = (5, 3)
SHARD_ID = 1
COUNTER = 1 << 32  # one step of the counter
LOW32 = 0xFFFFFFFF


@functools.cache
def _sharding():
    return row_sharding(build_mesh(None, "data"), "data")


def make_shard() -> Shard:
    return Shard(ShardSpec(SHARD_ID, LAYOUT, WIDTHS, warmup=False), _sharding())


def group(*ops: tuple) -> GroupBatch:
    """A group batch from ``(op, local row, start, count, pages)`` tuples."""
    cols = [np.array([op[i] for op in ops], np.int32) for i in range(4)]
    pages = np.array([p for op in ops for p in op[4]], np.int32)
    return GroupBatch(*cols, pages)


def batch(shard: Shard, generation: int, *ops: tuple) -> ShardBatch:
    """The next epoch for ``shard``, of ``generation``, with ``ops`` in group 0."""
    groups = (group(*ops), GroupBatch.empty())
    return ShardBatch(shard.epoch + 1, shard.epoch, SHARD_ID, groups, generation)


def snapshot(shard: Shard) -> tuple:
    arrays = [*shard.tables, *shard.counts, *shard.inner]
    arrays += [shard.snapshot(g) for g in range(len(WIDTHS))]
    return (shard.generation, shard.epoch, shard.checksum, [a.tobytes() for a in arrays])


def status_round_trips(shard: Shard) -> None:
    """The shard's status still encodes (generation is a u64 on the wire)."""
    ack = shard.status()
    assert decode_reply(encode_reply(ack), LAYOUT.num_shards) == ack


@pytest.fixture
def fenced() -> Shard:
    """A shard fenced with counter 5 that applied one epoch of it."""
    shard = make_shard()
    gen = 5 * COUNTER + 0x1234
    shard.fence(gen)
    shard.apply(batch(shard, gen, (OP_SET, 0, 0, 2, [4, 5])))
    return shard


# ---------------------------------------------------------------------------- Shard.fence


def test_a_lower_generation_is_fenced_off_and_the_higher_one_still_applies(fenced):
    gen = fenced.generation
    before = snapshot(fenced)
    for lower in (gen - 1, 4 * COUNTER + LOW32, 0, 1):
        with pytest.raises(FencedError) as info:
            fenced.fence(lower)
        assert (info.value.generation, info.value.holder) == (lower, gen)
        assert snapshot(fenced) == before
    with pytest.raises(FencedError):  # and the lower generation's batches stay refused
        fenced.apply(batch(fenced, gen - 1, (OP_APPEND, 0, 2, 3, [6])))
    assert snapshot(fenced) == before
    ack = fenced.apply(batch(fenced, gen, (OP_APPEND, 0, 2, 3, [6])))
    assert ack.applied and ack.generation == gen and ack.epoch == 2
    assert fenced.tables[0][0].tolist() == [4, 5, 6, 0, 0]
    status_round_trips(fenced)


def test_the_same_or_a_next_generation_is_taken(fenced):
    gen = fenced.generation
    assert fenced.fence(gen).generation == gen  # a fence sent again
    higher = new_generation(gen)
    assert fenced.fence(higher).generation == higher
    top = (5 + GENERATION_STEP) * COUNTER + LOW32  # the largest step allowed from counter 5
    fenced.fence(top)
    assert fenced.generation == top
    status_round_trips(fenced)


@pytest.mark.parametrize(
    ("generation", "match"),
    [
        (2**70, "2\\*\\*64"),
        (2**64, "2\\*\\*64"),
        (-1, "2\\*\\*64"),
        (-(2**70), "2\\*\\*64"),
        (True, "must be an int"),
        (5.0 * COUNTER, "must be an int"),
        (np.uint64(6 * COUNTER), "must be an int"),
        ("6", "must be an int"),
        (None, "must be an int"),
        ((6 + GENERATION_STEP) * COUNTER, "jumps"),
        (LOW32 << 32, "jumps"),  # the last counter: every later take-over would wrap
        (MAX_GENERATION, "jumps"),
    ],
)
def test_a_malformed_or_runaway_generation_is_refused_without_change(fenced, generation, match):
    before = snapshot(fenced)
    with pytest.raises(WireFormatError, match=match) as info:
        fenced.fence(generation)
    assert len(str(info.value)) < 400
    assert snapshot(fenced) == before
    status_round_trips(fenced)
    ack = fenced.apply(batch(fenced, before[0], (OP_APPEND, 0, 2, 3, [6])))
    assert ack.applied and ack.generation == before[0]


def test_a_fresh_shard_takes_a_generation_of_a_long_lived_table():
    """A recovery fences new shard processes (generation 0) with the coordinator's own
    generation, however many take-overs it has counted: a fresh shard takes counters up to
    ``MAX_FIRST_COUNTER`` (half of them, so one call cannot use them up either)."""
    top = MAX_FIRST_COUNTER * COUNTER + LOW32
    for gen in (new_generation(0), (GENERATION_STEP + 7) * COUNTER + 3, top):
        shard = make_shard()
        assert shard.fence(gen).generation == gen
        status_round_trips(shard)
    shard = make_shard()
    before = snapshot(shard)
    for bad, match in [
        (top + 1, "jumps"),
        (LOW32 << 32, "jumps"),
        (2**64, "2\\*\\*64"),
        (-1, "2\\*\\*64"),
        (2**70, "2\\*\\*64"),
    ]:
        with pytest.raises(WireFormatError, match=match):
            shard.fence(bad)
    assert snapshot(shard) == before


# ---------------------------------------------------------------------------- new_generation


def test_new_generation_adds_one_to_the_counter():
    for above in (0, 1, COUNTER - 1, COUNTER, 7 * COUNTER + LOW32, (LOW32 - 1) << 32):
        gen = new_generation(above)
        assert gen > above and gen >> 32 == (above >> 32) + 1 and gen <= MAX_GENERATION


@pytest.mark.parametrize("above", [LOW32 << 32, MAX_GENERATION, (LOW32 << 32) | 5])
def test_new_generation_refuses_an_exhausted_counter_instead_of_wrapping(above):
    with pytest.raises(ValueError, match="exhausted"):
        new_generation(above)


@pytest.mark.parametrize("above", [-1, 2**64, 2**70, True, 1.0])
def test_new_generation_refuses_what_is_not_a_generation(above):
    with pytest.raises(ValueError, match="generation"):
        new_generation(above)
