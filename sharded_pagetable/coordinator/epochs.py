"""What an epoch is to the coordinator: what each shard must report, who did not, and the
full state that rebuilds a shard at it.

Pure functions over the mirror (its published rows and checksum terms) and the shards'
answers.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..constants import MAX_GENERATION
from ..routing.layout import ShardLayout
from ..rows import checksum
from ..rows.messages import GroupBatch, Schedule, ShardBatch
from ..table.host import HostRows
from .backend import Result


@dataclass(frozen=True)
class EpochId:
    """Which epoch a plan is: its number, the epoch it builds on, the sending generation."""

    epoch: int
    base: int
    generation: int


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One staged epoch: what the shards it touches are sent, and what the mirror publishes.

    ``batches`` are the changed rows of each group over global rows, ``cuts`` where the
    shards' bounds fall among them (found once, for the split and the checksums alike),
    ``schedule`` the step's token counts of every row (or None), ``touched`` the shards the
    epoch reaches (``i64[k]``, sorted: see :func:`touched_shards`), ``messages`` one batch per
    touched shard in that order, ``kv_copies`` each group's whole copy plan.
    """

    id: EpochId
    num_reqs: int
    batches: tuple[GroupBatch, ...]
    cuts: tuple[np.ndarray, ...]
    schedule: Schedule | None
    touched: np.ndarray
    messages: tuple[ShardBatch, ...]
    kv_copies: tuple[np.ndarray, ...]
    versions: tuple[int, ...]  # each group's cpu_version when staged: a later change voids it


def touched_shards(
    cuts: Sequence[np.ndarray],
    schedule: Schedule | None,
    held: Schedule | None,
    kv_copies: Sequence[np.ndarray],
    num_shards: int,
) -> np.ndarray:
    """``i64[k]`` sorted shards an epoch must reach: those with a changed row in any group
    (``cuts``: each group's batch cut at the shard bounds), those whose part of the step
    ``schedule`` differs from the part they hold (``held``: the schedule every shard holds
    now, None if none), and, when the epoch carries KV copies, every shard (the copies are
    one plan every process of the model step takes part in).

    A shard left out holds exactly what the epoch would give it, so it keeps its epoch."""
    if any(plan.size for plan in kv_copies) or (schedule is None) != (held is None):
        return np.arange(num_shards, dtype=np.int64)
    hit = np.zeros(num_shards, bool)
    for cut in cuts:
        hit |= cut[1:] != cut[:-1]
    if schedule is not None:
        differs = (schedule.sched != held.sched) | (schedule.done != held.done)
        hit |= differs.reshape(num_shards, -1).any(axis=1)
    return np.flatnonzero(hit)


def shard_messages(
    epoch: EpochId,
    batches: Sequence[GroupBatch],
    cuts: Sequence[np.ndarray],
    bounds: np.ndarray,
    schedule: Schedule | None,
    kv_copies: tuple[np.ndarray, ...],
    touched: np.ndarray,
    bases: np.ndarray,
) -> tuple[ShardBatch, ...]:
    """One epoch's batch for every ``touched`` shard: its rows of every group's batch
    (renumbered locally), its rows' slice of the step schedule, and the whole KV copy plan,
    built on the epoch the shard holds (``bases[s]``)."""
    shards = touched.tolist()
    pieces = [b.pieces(bounds, cut, shards) for b, cut in zip(batches, cuts, strict=True)]
    count = len(shards)
    out = []
    for i, s in enumerate(shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        part = None if schedule is None else Schedule(schedule.sched[lo:hi], schedule.done[lo:hi])
        groups = tuple(p[i] for p in pieces)
        base = int(bases[s])
        out.append(
            ShardBatch(epoch.epoch, base, s, groups, epoch.generation, part, kv_copies, count)
        )
    return tuple(out)


def expected_after(
    expected: Sequence[int],
    cuts: Sequence[np.ndarray],
    deltas: Sequence[np.ndarray],
    touched: np.ndarray,
) -> list[int]:
    """Each shard's checksum once an epoch is applied, from ``expected`` and every changed
    row's checksum change ``deltas`` (``HostRows.terms_after``), per group, split by shard at
    ``cuts`` (:attr:`EpochPlan.cuts`); only the ``touched`` shards' can change."""
    out = list(expected)
    shards = touched.tolist()
    for cut, delta in zip(cuts, deltas, strict=True):
        if not delta.size:
            continue
        running = np.zeros(delta.size + 1, np.uint64)
        np.cumsum(delta, dtype=np.uint64, out=running[1:])
        per_shard = np.diff(running[cut])  # u64 differences wrap, as the checksum does
        for s in shards:
            out[s] = checksum.add(out[s], int(per_shard[s]))
    return out


def new_generation(above: int) -> int:
    """A coordinator generation greater than ``above``: a counter in the high 32 bits and 32
    random bits, so two coordinators taking over at once still differ.

    Raises ``ValueError`` if ``above`` is not a generation (an int in ``0..MAX_GENERATION``)
    or holds the last counter: wrapping to 0 would give a lower generation, one every shard
    refuses. A fence moves a shard's counter by at most ``GENERATION_STEP`` (a new shard's
    to ``MAX_FIRST_COUNTER``), so only some 2**31 / 2**16 runaway fences could get there.
    """
    if type(above) is not int:
        raise ValueError(f"a generation must be an int, got {type(above).__name__}")
    if not 0 <= above <= MAX_GENERATION:
        shown = above if above.bit_length() <= 80 else f"of {above.bit_length()} bits"
        raise ValueError(f"generation {shown} is not in 0..2**64-1")
    counter = (above >> 32) + 1
    if counter > MAX_GENERATION >> 32:
        raise ValueError(
            f"the shards obey generation {above:#x}, whose take-over counter is the last one: "
            "the generation counter is exhausted and no coordinator can take them over; start "
            "the table on new shard processes"
        )
    return (counter << 32) | secrets.randbits(32)


def published_states(
    hosts: Sequence[HostRows],
    layout: ShardLayout,
    epoch: int,
    generation: int,
    schedule: Schedule | None = None,
) -> list[ShardBatch | None]:
    """Full-state batches rebuilding each shard at the published ``epoch`` (None at 0),
    with their rows' part of that epoch's ``schedule`` (all rows) when given."""
    if epoch == 0:
        return [None] * layout.num_shards
    out = []
    for s in range(layout.num_shards):
        rows = layout.shard_rows(s)
        views = [h.published_rows(rows.start, rows.stop) for h in hosts]
        state = ShardBatch.full_state(epoch, s, *zip(*views, strict=True), generation)
        if schedule is not None:
            part = Schedule(
                schedule.sched[rows.start : rows.stop], schedule.done[rows.start : rows.stop]
            )
            state = dataclasses.replace(state, schedule=part)
        out.append(state)
    return out


def live_rows(hosts: Sequence[HostRows]) -> np.ndarray:
    """``i32[k]`` sorted rows holding pages in any group as last published."""
    live = np.zeros(hosts[0].num_rows, bool)
    for host in hosts:
        live |= host.published > 0
    return np.flatnonzero(live).astype(np.int32)


def shard_sums(hosts: Sequence[HostRows], layout: ShardLayout) -> list[int]:
    """Each shard's checksum from scratch, from the published rows' terms."""
    total = np.zeros(layout.num_shards, np.uint64)
    for host in hosts:
        mixed = host.consts.mix[: layout.max_num_reqs] * host.terms
        total += mixed.reshape(layout.num_shards, -1).sum(axis=1, dtype=np.uint64)
    return [int(v) for v in total]


def failures(
    results: Sequence[Result],
    shards: Sequence[int],
    expected: Sequence[int],
    epochs: Sequence[int] | int,
    verb: str,
) -> list[tuple[int, str]]:
    """``(shard, reason)`` of every result (of ``shards[i]``) that is not ``(epochs[i],
    expected[shards[i]])`` (``epochs``: one for all, or one per result).

    A refusal counts as much as a dead shard: the coordinator sent what its mirror says the
    shard holds, so a shard that refuses it holds something else (another epoch's content,
    rows the mirror does not know) and must be rebuilt before the table can go on."""
    out = []
    for i, (s, res) in enumerate(zip(shards, results, strict=True)):
        epoch = epochs if isinstance(epochs, int) else epochs[i]
        if isinstance(res, BaseException):
            out.append((s, f"{type(res).__name__}: {res}"))
        elif res.epoch != epoch or res.checksum != expected[s]:
            reason = (
                f"{verb} epoch {res.epoch} checksum {res.checksum:#x}, expected epoch "
                f"{epoch} checksum {expected[s]:#x}"
            )
            out.append((s, reason))
    return out
