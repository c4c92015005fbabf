"""Attach: a new coordinator takes over shards that outlived the old one.

A take-over has one point of no return, the fence. Everything before it only reads: the
shards' status and a full-state export of each at the generation it obeys, checked for
consistency. Anything that fails there raises and changes nothing, so the previous
coordinator stays in charge. Shards may hold different epochs (a commit reaches only the
shards it touches); the newest epoch is settled by how many shards it was sent to
(``ShardBatch.touched``): if fewer hold it, its holders step back. From the fence on, the new coordinator owns the shards and
completes the take-over whatever happens: a shard that dies after its read is rebuilt from
that read (the table is returned fail-closed, and ``recover()``, or the first call with
``recover="auto"``, restarts it). The one case it cannot complete is a shard lost after
its read while the old coordinator was still publishing (its read is then not at the
settled epoch); that raises ``RuntimeError`` and is documented in the README.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import FencedError, ShardFailedError, WireFormatError
from ..rows.messages import Ack, ShardBatch
from .backend import Backend
from .epochs import new_generation
from .mirror import Mirror

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TakeOver:
    """What an attach leaves the new coordinator: its generation, the table's epoch (the
    newest any shard holds), the epoch each shard holds, each shard's checksum, and the
    shard lost on the way (None if every shard came through)."""

    generation: int
    epoch: int
    held: list[int]
    expected: list[int]
    lost: ShardFailedError | None


def read_shards(backend: Backend) -> tuple[list[Ack], list[ShardBatch | None]]:
    """Every shard's status and full state, read at the generation it obeys (changes
    nothing; raises if any shard cannot be read)."""
    status = backend.status()
    states = backend.export([a.generation for a in status])
    for s, state in enumerate(states):
        if isinstance(state, BaseException):
            if isinstance(state, FencedError):
                raise state
            raise ShardFailedError(s, -1, f"{type(state).__name__}: {state}", during="attaching")
        _check_state(s, state, before_epoch(state))
    return status, states


def unfinished(holders: list[ShardBatch | None]) -> bool:
    """Whether the newest epoch, held as ``holders``, was left unfinished: fewer shards
    hold it than it was sent to. (An epoch only ever follows a confirmed one, so only the
    newest can be unfinished; a holder rebuilt at it by a recovery says nothing, and the
    epoch was confirmed.)"""
    said = [0 if h is None else h.touched for h in holders]
    return min(said) > 0 and len(holders) < max(said)


def take_over(backend: Backend, mirror: Mirror) -> TakeOver:
    """Fence every shard with a new generation, settle them (when fewer shards hold the
    newest epoch than it was sent to, a commit the old coordinator never finished, those
    shards step back) and load their rows into the empty ``mirror`` as published. Shards
    may hold different epochs: a commit reaches only the shards it touches."""
    status, before = read_shards(backend)
    generation = new_generation(max(a.generation for a in status))
    acks = backend.fence(generation)  # the point of no return
    for res in acks:
        if isinstance(res, FencedError):
            raise FencedError(generation, res.holder)  # an even newer coordinator holds them
    lost: dict[int, str] = {}
    live = {s: a for s, a in enumerate(acks) if not _lost(s, a, lost)}
    states = list(before)
    exported = backend.export([generation] * len(acks))
    for s in list(live):
        if _lost(s, exported[s], lost):
            del live[s]
        else:
            states[s] = exported[s]
    held = [before_epoch(state) for state in states]
    top = max(held)
    holders = [s for s in range(len(held)) if held[s] == top]
    if top and unfinished([states[s] for s in holders]):
        back = [s for s in holders if s in live]
        if len(back) < len(holders):
            raise RuntimeError(
                f"epoch {top} was left unfinished and shards {sorted(set(holders) - set(back))} "
                "that hold it were lost during the attach: they cannot step back"
            )
        for s, res in zip(back, backend.rollback(back, top, generation), strict=True):
            if not _lost(s, res, lost):
                live[s] = res
        again = backend.export([generation] * len(acks))
        for s in back:
            if s in live and not _lost(s, again[s], lost):
                states[s] = again[s]
                held[s] = before_epoch(again[s])
            else:
                live.pop(s, None)
                raise RuntimeError(f"shard {s} was lost while stepping back from epoch {top}")
        log.warning("shards %s stepped back from the unfinished epoch %d", back, top)
    for s, state in enumerate(states):
        if s in live and live[s].epoch != held[s]:
            raise RuntimeError(
                f"shard {s} holds epoch {live[s].epoch}, but exported its rows at {held[s]}"
            )
        _check_state(s, state, held[s])
        if state is not None:
            mirror.load(s, state)
    expected = mirror.shard_sums()
    for s, ack in live.items():
        if ack.checksum != expected[s]:
            raise RuntimeError(
                f"shard {s} reports checksum {ack.checksum:#x} after attach, its rows "
                f"{expected[s]:#x}"
            )
    error = None
    if lost:
        shard = min(lost)
        error = ShardFailedError(shard, max(held), lost[shard], during="attaching")
        log.warning("attach took the table over without shards %s: %s", sorted(lost), error)
    return TakeOver(generation, max(held), held, expected, error)


def before_epoch(state: ShardBatch | None) -> int:
    return 0 if state is None else state.epoch


def _lost(s: int, res: object, lost: dict[int, str]) -> bool:
    """Record shard ``s`` as lost if ``res`` is its failure; another coordinator's fence is
    re-raised (two attaches at once: the newer one wins)."""
    if isinstance(res, FencedError):
        raise res
    if isinstance(res, BaseException):
        lost[s] = f"{type(res).__name__}: {res}"
        return True
    return False


def _check_state(s: int, state: ShardBatch | None, epoch: int) -> None:
    if state is None:
        if epoch != 0:
            raise WireFormatError(f"shard {s} holds epoch {epoch} but exported no state")
        return
    if state.shard != s or state.epoch != epoch:
        raise WireFormatError(
            f"shard {s} exported shard {state.shard} at epoch {state.epoch}, expected epoch {epoch}"
        )
