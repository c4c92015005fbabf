"""The data-parallel serving workload: requests pinned to shards, KV-local pages, migration.

A ``ShardedPageTable(..., num_shards=S, pages_per_shard=P)`` lets a row hold only pages of
its own shard's pool, so a scheduler for it works like vLLM's or EasyDeL's data-parallel
ranks: every request lives on one shard, and each shard schedules its own row block under
its own budget (``token_budget // S``) from its own pages. Here each shard runs the
:class:`ServingWorkload` algorithm (condense, decode-first reorder, chunked prefill, decode,
free on finish) in local rows and pages; this module only offsets its ops into the global
table (shard ``s``: rows ``+ s * R/S``, page ids ``+ s * P`` in every group), spreads the
arrivals over the shards and, with ``migrate=True``, moves requests between shards.

When it migrates (``migrate=True``): at the start of a step, after finished requests are
cleared, every shard whose scheduled tokens filled its whole budget in the previous step
(saturated) hands its last decode row (the first to starve under decode-first scheduling)
to the shard with the most budget left over in that step, provided that shard has a free
row and unpromised pages for the request's whole length. The ops are ``move_row(src, tgt,
page_ids=new)`` with fresh pages from the target pool (the table records the KV copy of the
old pages), then ``clear_row(src)``, and the source shard condenses the hole at once (its
last live row moves into it), so every shard's block stays dense within the step. The
request carries on from its computed count in the target row. Its old pages return to the
source pool one step later, once the commit that publishes the copy has happened, so no
page is reused before its KV has been read.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from .workload import Request, ServingWorkload, Step, WorkloadConfig, draw_arrivals

Op = tuple[str, tuple[Any, ...]]
T = TypeVar("T")


def _shift(pages: Sequence[Sequence[int]], base: int) -> list[list[int]]:
    return [[p + base for p in ids] for ids in pages]


def offset_op(op: Op, row0: int, page0: int) -> Op:
    """A shard-local row op as the global table sees it: rows ``+ row0``, pages ``+ page0``."""
    name, args = op
    if name in ("clear_row", "move_row", "swap_row"):
        return name, tuple(a + row0 for a in args)
    if name == "add_row":
        pages, row = args
        return name, (_shift(pages, page0), row + row0)
    if name == "append_rows_batch":
        per_req, rows = args
        return name, ([_shift(p, page0) for p in per_req], [r + row0 for r in rows])
    raise ValueError(f"unknown row op {name!r}")


class ShardedServingWorkload:
    """Scheduler steps for a ``ShardedPageTable`` with KV-local page pools.

    Args:
      config: arrivals, lengths and the whole table's ``token_budget``
        (``max_num_batched_tokens``); each shard schedules ``token_budget // num_shards``.
        ``pages_per_group`` must be None: the pools are ``pages_per_shard`` per group.
      max_num_reqs, max_model_len, page_sizes: as the table's.
      num_shards, pages_per_shard: as the table's ``num_shards`` and ``pages_per_shard``.
      migrate: move decode requests from saturated shards to shards with room (see the
        module docstring for the rule).

    Example::

      wl = ShardedServingWorkload(WorkloadConfig(seed=1), 256, 2048, [16], 4, 512)
      step = wl.step()
      apply_ops(table, step.ops)
      table.commit(step.num_reqs, num_scheduled_tokens=step.scheduled,
                   num_computed_tokens=step.computed)
    """

    def __init__(
        self,
        config: WorkloadConfig,
        max_num_reqs: int,
        max_model_len: int,
        page_sizes: Sequence[int],
        num_shards: int,
        pages_per_shard: int,
        *,
        migrate: bool = False,
    ) -> None:
        if num_shards < 1 or max_num_reqs % num_shards:
            raise ValueError(
                f"num_shards must be positive and divide max_num_reqs={max_num_reqs}, "
                f"got {num_shards}"
            )
        if config.token_budget < num_shards:
            raise ValueError(
                f"token_budget={config.token_budget} leaves no tokens per shard "
                f"for num_shards={num_shards}"
            )
        if config.pages_per_group is not None:
            raise ValueError(
                f"pages_per_group={config.pages_per_group} is not used here: "
                "each shard's pool is pages_per_shard pages per group"
            )
        self.config = config
        self.num_shards = num_shards
        self.pages_per_shard = pages_per_shard
        self.rows_per_shard = max_num_reqs // num_shards
        self.migrate = migrate
        local = dataclasses.replace(
            config,
            arrivals_per_step=0.0,  # arrivals are drawn here and spread over the shards
            token_budget=config.token_budget // num_shards,
            pages_per_group=(pages_per_shard,) * len(page_sizes),
        )
        self.shards = [
            ServingWorkload(local, self.rows_per_shard, max_model_len, page_sizes)
            for _ in range(num_shards)
        ]
        self._rng = np.random.default_rng(config.seed)
        self._next_rid = 0
        self.waiting: deque[Request] = deque()  # arrived, not yet admitted to any shard (FIFO)
        self._spare = [local.token_budget] * num_shards  # budget each shard left last step
        self._copying: list[tuple[int, list[list[int]]]] = []  # (shard, pages) until published
        self.migrations = 0
        self.kv_pages_moved = 0

    @property
    def served(self) -> int:
        return sum(wl.served for wl in self.shards)

    def _local(self, s: int, ops: list[Op], phase: Callable[[list[Op]], T]) -> T:
        """Run one phase of shard ``s``'s workload and append its ops, made global."""
        out: list[Op] = []
        result = phase(out)
        ops.extend(offset_op(op, s * self.rows_per_shard, s * self.pages_per_shard) for op in out)
        return result

    def _migrate(self, ops: list[Op]) -> tuple[int, int]:
        """One decode request from each saturated shard to the roomiest shard that holds it."""
        spare = list(self._spare)
        moved = pages = 0
        for src, wl in enumerate(self.shards):
            decode = [i for i, r in enumerate(wl.rows) if not r.in_prefill]
            if self._spare[src] > 0 or not decode:
                continue
            row = decode[-1]
            req = wl.rows[row]
            targets = [
                t
                for t, other in enumerate(self.shards)
                if t != src and spare[t] > 0 and other.can_hold(req)
            ]
            if not targets:
                continue
            tgt = max(targets, key=lambda t: (spare[t], -t))
            evicted: list[Op] = []
            wl.evict(row, evicted)  # clear_row(row) + the condense that fills the hole
            old = req.pages
            tgt_row, new = self.shards[tgt].adopt(req)
            rps, pps = self.rows_per_shard, self.pages_per_shard
            ops.append(("move_row", (src * rps + row, tgt * rps + tgt_row, _shift(new, tgt * pps))))
            ops.extend(offset_op(op, src * rps, src * pps) for op in evicted)
            self._copying.append((src, old))
            spare[tgt] -= 1
            moved += 1
            pages += sum(len(ids) for ids in old)
        return moved, pages

    def _admit(self, ops: list[Op], budgets: list[int]) -> int:
        """Admit waiting requests in arrival order, each to the shard with the most budget
        left, then free rows, then spare pages (lowest shard on ties); stop at the first
        request no shard can take."""
        admitted = 0
        while self.waiting:
            req = self.waiting[0]
            fits = [s for s, wl in enumerate(self.shards) if budgets[s] > 0 and wl.can_hold(req)]
            if not fits:
                break

            def room(s: int) -> tuple[int, int, int, int]:
                wl = self.shards[s]
                return budgets[s], self.rows_per_shard - len(wl.rows), min(wl.spare_pages()), -s

            s = max(fits, key=room)
            self.waiting.popleft()
            budgets[s] = self._local(
                s, ops, functools.partial(self.shards[s].admit, req, budget=budgets[s])
            )
            admitted += 1
        return admitted

    def step(self) -> Step:
        """Advance every shard one step; ops, rows and page ids are global."""
        ops: list[Op] = []
        for s, pages in self._copying:  # the last commit published their KV copies
            self.shards[s].release_pages(pages)
        self._copying = []
        finished = sum(
            self._local(s, ops, wl.finish_and_condense) for s, wl in enumerate(self.shards)
        )
        moved, pages = self._migrate(ops) if self.migrate else (0, 0)
        budgets = [self._local(s, ops, wl.schedule_running) for s, wl in enumerate(self.shards)]
        arrivals = draw_arrivals(self._rng, self.config, self._next_rid)
        self._next_rid += len(arrivals)
        self.waiting.extend(arrivals)
        admitted = self._admit(ops, budgets)
        self._spare = budgets
        self.migrations += moved
        self.kv_pages_moved += pages
        return self._assemble(ops, finished, admitted, moved, pages)

    def _assemble(
        self, ops: list[Op], finished: int, admitted: int, moved: int, pages: int
    ) -> Step:
        rps = self.rows_per_shard
        parts = [wl.advance([], 0, 0) for wl in self.shards]
        num_reqs = max((s * rps + p.num_reqs for s, p in enumerate(parts) if p.num_reqs), default=0)
        scheduled = np.zeros(num_reqs, np.int32)
        computed = np.zeros(num_reqs, np.int32)
        uids = np.full(num_reqs, -1, np.int32)
        for s, p in enumerate(parts):
            block = slice(s * rps, s * rps + p.num_reqs)
            scheduled[block], computed[block], uids[block] = p.scheduled, p.computed, p.row_uids
        return Step(
            tuple(ops),
            num_reqs,
            np.concatenate([p.token_rows + s * rps for s, p in enumerate(parts)]).astype(np.int32),
            np.concatenate([p.token_positions for p in parts]).astype(np.int32),
            finished,
            admitted,
            scheduled=scheduled,
            computed=computed,
            row_uids=uids,
            migrations=moved,
            kv_pages_moved=pages,
        )

    def recompute(self, rids: set[int]) -> int:
        """Prefill requests ``rids`` again from scratch (their KV is lost); see
        :meth:`ServingWorkload.recompute`."""
        return sum(wl.recompute(rids) for wl in self.shards)

    def live_pages(self) -> list[list[int]]:
        """Global page ids per group held by the live requests, shard by shard."""
        per_shard = [wl.live_pages() for wl in self.shards]
        groups = len(per_shard[0])
        return [
            [p + s * self.pages_per_shard for s, lp in enumerate(per_shard) for p in lp[g]]
            for g in range(groups)
        ]

    def copying_pages(self) -> list[list[int]]:
        """Global page ids per group held back until the last migration's copy is published."""
        groups = len(self.shards[0].page_sizes)
        return [
            [p + s * self.pages_per_shard for s, pages in self._copying for p in pages[g]]
            for g in range(groups)
        ]
