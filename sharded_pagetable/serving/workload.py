"""A deterministic serving workload that drives a page table like a scheduler does.

Requests arrive with prompt and output lengths drawn from configurable ranges; prefill is
chunked under a per-step token budget; decode adds one token per step; finished requests
free their rows and pages. The persistent batch is kept dense (condense: move the last live
row into a hole) with decode rows first (reorder: swap), so rows travel between shards.
Pages come from per-group free lists and return there when a request finishes, so no page id
is ever held by two live rows.

The workload never reads the table: each :meth:`ServingWorkload.step` returns the row
operations as data, so the same seed replays identically on any table. A step also carries
each row's ``scheduled``/``computed`` tokens and request id, the schedule that
``commit(num_reqs, num_scheduled_tokens=..., num_computed_tokens=...)`` takes. A request
schedules ``prompt_len + output_len - 1`` tokens in its life: the last sampled token is
never fed back. ``ShardedServingWorkload`` (``sharded_workload.py``) runs one of these per
shard through the phase methods that :meth:`ServingWorkload.step` calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..constants import cdiv


@dataclass(frozen=True)
class WorkloadConfig:
    """Arrival and length distributions (uniform over inclusive ranges) and the step budget.

    Args:
      seed: makes the whole run reproducible.
      arrivals_per_step: mean of the Poisson number of new requests per step.
      prompt_len, output_len: ``(min, max)`` tokens.
      token_budget: tokens scheduled per step (``max_num_batched_tokens``).
      pages_per_group: size of each group's page pool (default: enough for a full table).
    """

    seed: int = 0
    arrivals_per_step: float = 4.0
    prompt_len: tuple[int, int] = (32, 1024)
    output_len: tuple[int, int] = (16, 256)
    token_budget: int = 2048
    pages_per_group: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {lo, hi}")
        if self.arrivals_per_step < 0:
            raise ValueError(f"arrivals_per_step must be >= 0, got {self.arrivals_per_step}")
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be positive, got {self.token_budget}")


@dataclass
class Request:
    rid: int
    prompt_len: int
    output_len: int
    computed: int = 0  # tokens whose KV is written
    generated: int = 0
    scheduled: int = 0  # tokens scheduled in the current step
    pages: list[list[int]] = field(default_factory=list)  # per group

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.output_len

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prompt_len


def _no_rows() -> np.ndarray:
    return np.zeros(0, np.int32)


@dataclass(frozen=True)
class Step:
    """One scheduler step: row ops in call order, the batch size, and scheduled tokens.

    ``scheduled`` and ``computed`` are what ``commit(num_reqs, num_scheduled_tokens=...,
    num_computed_tokens=...)`` takes; row ``i``'s tokens in ``token_rows``/``token_positions``
    are positions ``computed[i] .. computed[i] + scheduled[i] - 1``.
    """

    ops: tuple[tuple[str, tuple[Any, ...]], ...]
    num_reqs: int
    token_rows: np.ndarray  # i32[T] row of each scheduled token
    token_positions: np.ndarray  # i32[T] position of each scheduled token
    finished: int
    admitted: int
    scheduled: np.ndarray = field(default_factory=_no_rows)  # i32[num_reqs] tokens this step
    computed: np.ndarray = field(default_factory=_no_rows)  # i32[num_reqs] tokens before it
    row_uids: np.ndarray = field(default_factory=_no_rows)  # i32[num_reqs] request id, -1 empty
    migrations: int = 0  # requests moved across shards this step (ShardedServingWorkload)
    kv_pages_moved: int = 0  # pages whose KV those moves copy, summed over groups


def draw_arrivals(
    rng: np.random.Generator, config: WorkloadConfig, first_rid: int
) -> list[Request]:
    """This step's new requests (Poisson count, uniform lengths), ids from ``first_rid``."""
    reqs = []
    for _ in range(rng.poisson(config.arrivals_per_step)):
        p = int(rng.integers(config.prompt_len[0], config.prompt_len[1] + 1))
        o = int(rng.integers(config.output_len[0], config.output_len[1] + 1))
        reqs.append(Request(first_rid + len(reqs), p, o))
    return reqs


def apply_ops(table: Any, ops: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
    """Replay a step's row operations on any table with the page-table API."""
    for name, args in ops:
        getattr(table, name)(*args)


class ServingWorkload:
    """Generates scheduler steps for a table of ``max_num_reqs`` rows.

    Example::

      wl = ServingWorkload(WorkloadConfig(seed=1), 256, 8192, [16, 64])
      step = wl.step()
      apply_ops(table, step.ops)
      table.commit(step.num_reqs)
    """

    def __init__(
        self,
        config: WorkloadConfig,
        max_num_reqs: int,
        max_model_len: int,
        page_sizes: Sequence[int],
    ) -> None:
        if config.prompt_len[1] + config.output_len[1] > max_model_len:
            raise ValueError(
                f"prompt_len max + output_len max = "
                f"{config.prompt_len[1] + config.output_len[1]} exceeds max_model_len={max_model_len}"
            )
        self.config = config
        self.max_num_reqs = max_num_reqs
        self.page_sizes = tuple(page_sizes)
        self._rng = np.random.default_rng(config.seed)
        pools = config.pages_per_group or tuple(
            max_num_reqs * cdiv(max_model_len, s) for s in self.page_sizes
        )
        if len(pools) != len(self.page_sizes):
            raise ValueError(
                f"pages_per_group has {len(pools)} pools for {len(self.page_sizes)} groups"
            )
        longest = config.prompt_len[1] + config.output_len[1]
        for g, (pool, size) in enumerate(zip(pools, self.page_sizes, strict=True)):
            if pool < cdiv(longest, size):
                raise ValueError(
                    f"group {g}'s pool of {pool} pages cannot hold the longest request "
                    f"({longest} tokens need {cdiv(longest, size)} pages of {size})"
                )
        self.free_pages = [deque(range(n)) for n in pools]
        self.reserved = [0] * len(self.page_sizes)  # pages promised to admitted requests
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # the persistent batch: rows[i] lives in row i
        self._next_rid = 0
        self.served = 0

    def _pages_for(self, tokens: int) -> list[int]:
        return [cdiv(tokens, s) for s in self.page_sizes]

    def _arrive(self) -> None:
        reqs = draw_arrivals(self._rng, self.config, self._next_rid)
        self.waiting.extend(reqs)
        self._next_rid += len(reqs)

    def _grow(self, req: Request, tokens: int) -> list[list[int]]:
        """New pages per group so ``req`` can hold ``tokens`` tokens."""
        new = []
        for g, need in enumerate(self._pages_for(tokens)):
            have = len(req.pages[g])
            ids = [self.free_pages[g].popleft() for _ in range(need - have)]
            self.reserved[g] -= len(ids)
            req.pages[g].extend(ids)
            new.append(ids)
        return new

    # The phases of :meth:`step`, in call order. ShardedServingWorkload runs one workload per
    # shard and calls them directly, so the algorithm lives here once.

    def finish_and_condense(self, ops: list) -> int:
        """Clear finished rows, return their pages, and move the last live rows into holes."""
        rows: list[Request | None] = list(self.rows)
        finished = 0
        for i, req in enumerate(self.rows):
            if req.generated >= req.output_len:
                ops.append(("clear_row", (i,)))
                for g, ids in enumerate(req.pages):
                    self.free_pages[g].extend(ids)
                    self.reserved[g] -= self._pages_for(req.total_len)[g] - len(ids)
                rows[i] = None
                finished += 1
        self._condense(rows, ops)
        self.served += finished
        return finished

    def _condense(self, rows: list[Request | None], ops: list) -> None:
        """Move the last live rows into the holes (``None``) and make ``rows`` the batch."""
        lo, hi = 0, len(rows) - 1
        while True:
            while hi >= 0 and rows[hi] is None:
                hi -= 1
            while lo < len(rows) and rows[lo] is not None:
                lo += 1
            if lo >= hi:
                break
            ops.append(("move_row", (hi, lo)))
            ops.append(("clear_row", (hi,)))
            rows[lo], rows[hi] = rows[hi], None
        self.rows = [r for r in rows if r is not None]

    def schedule_running(self, ops: list) -> int:
        """Decode-first reorder, then this step's tokens for the running requests (one per
        decode row, then prefill chunks) and the pages they need. Returns the budget left."""
        self._reorder(ops)
        budget = self.config.token_budget
        for req in self.rows:
            req.scheduled = 0
            if not req.in_prefill and budget > 0:
                req.scheduled, budget = 1, budget - 1
        for req in self.rows:
            if req.in_prefill and budget > 0:
                req.scheduled = min(req.prompt_len - req.computed, budget)
                budget -= req.scheduled
        grown_rows, grown_ids = [], []
        for i, req in enumerate(self.rows):
            if req.scheduled:
                new = self._grow(req, req.computed + req.scheduled)
                if any(new):
                    grown_rows.append(i)
                    grown_ids.append(new)
        if grown_rows:
            ops.append(("append_rows_batch", (grown_ids, grown_rows)))
        return budget

    def spare_pages(self) -> list[int]:
        """Pages per group neither held nor promised to an admitted request."""
        return [len(f) - r for f, r in zip(self.free_pages, self.reserved, strict=True)]

    def can_hold(self, req: Request) -> bool:
        """A free row and unpromised pages for the whole of ``req`` (its final length)."""
        need = self._pages_for(req.total_len)
        spare = self.spare_pages()
        return len(self.rows) < self.max_num_reqs and all(
            s >= n for s, n in zip(spare, need, strict=True)
        )

    def admit(self, req: Request, ops: list, budget: int) -> int:
        """Add ``req`` as the last row with its first prefill chunk (``budget`` must be
        positive and :meth:`can_hold` true). Returns the budget left."""
        for g, n in enumerate(self._pages_for(req.total_len)):
            self.reserved[g] += n
        req.pages = [[] for _ in self.page_sizes]
        req.scheduled = min(req.prompt_len, budget)
        ops.append(("add_row", (self._grow(req, req.scheduled), len(self.rows))))
        self.rows.append(req)
        return budget - req.scheduled

    def _admit(self, ops: list, budget: int) -> tuple[int, int]:
        """Admit waiting requests while rows, budget and page reservations allow."""
        admitted = 0
        while self.waiting and budget > 0 and self.can_hold(self.waiting[0]):
            budget = self.admit(self.waiting.popleft(), ops, budget)
            admitted += 1
        return admitted, budget

    def evict(self, row: int, ops: list) -> Request:
        """Take the request in ``row`` out of the batch (it moves to another table) and
        condense the hole at once. Its pages stay out of the pool, still in ``req.pages``:
        the caller returns them with :meth:`release_pages` once their KV has been copied."""
        req = self.rows[row]
        for g, ids in enumerate(req.pages):
            self.reserved[g] -= self._pages_for(req.total_len)[g] - len(ids)
        rows: list[Request | None] = list(self.rows)
        rows[row] = None
        ops.append(("clear_row", (row,)))
        self._condense(rows, ops)
        return req

    def adopt(self, req: Request) -> tuple[int, list[list[int]]]:
        """Make ``req`` (evicted elsewhere, :meth:`can_hold` true) the last row with fresh
        pages, as many per group as it holds, and reserve the rest of its length. Emits no
        op: the caller moves the row. Returns the row and the new pages ``[group][pages]``."""
        if not self.can_hold(req):
            raise ValueError(f"request {req.rid} does not fit: rows or pages are short")
        held = [len(ids) for ids in req.pages]
        for g, n in enumerate(self._pages_for(req.total_len)):
            self.reserved[g] += n - held[g]
        req.pages = [[self.free_pages[g].popleft() for _ in range(n)] for g, n in enumerate(held)]
        self.rows.append(req)
        return len(self.rows) - 1, [list(ids) for ids in req.pages]

    def recompute(self, rids: set[int]) -> int:
        """The KV of requests ``rids`` is gone (a recovery reported their rows lost): each
        running one keeps its row and pages and prefills its whole context again, as
        vLLM's recompute preemption does; a request that already finished is left alone.
        Returns how many will be recomputed."""
        count = 0
        for req in self.rows:
            if req.rid in rids and req.generated < req.output_len and req.computed:
                if not req.in_prefill:
                    # The context so far (prompt + generated - 1 tokens) becomes the prompt;
                    # the total length, and so the pages promised, stay the same.
                    req.output_len -= req.generated - 1
                    req.prompt_len, req.generated = req.computed, 0
                req.computed = 0
                count += 1
        return count

    def release_pages(self, pages: Sequence[Sequence[int]]) -> None:
        """Return pages ``[group][pages]`` (of an evicted request) to the pool."""
        for g, ids in enumerate(pages):
            self.free_pages[g].extend(ids)

    def advance(self, ops: list, finished: int, admitted: int) -> Step:
        """Lay out this step's tokens in row order and move every request past them."""
        n = len(self.rows)
        scheduled = np.array([r.scheduled for r in self.rows], np.int32).reshape(n)
        computed = np.array([r.computed for r in self.rows], np.int32).reshape(n)
        uids = np.array([r.rid for r in self.rows], np.int32).reshape(n)
        tok_rows, tok_pos = [], []
        for i, req in enumerate(self.rows):
            k = req.scheduled
            if k:
                tok_rows.append(np.full(k, i, np.int32))
                tok_pos.append(np.arange(req.computed, req.computed + k, dtype=np.int32))
                req.computed += k
                if req.computed >= req.prompt_len:
                    req.generated += 1
        empty = np.empty(0, np.int32)
        return Step(
            tuple(ops),
            n,
            np.concatenate(tok_rows) if tok_rows else empty,
            np.concatenate(tok_pos) if tok_pos else empty,
            finished,
            admitted,
            scheduled=scheduled,
            computed=computed,
            row_uids=uids,
        )

    def _reorder(self, ops: list) -> None:
        """Decode rows first: swap a prefill row near the front with a decode row near the back."""
        rows = self.rows
        i, j = 0, len(rows) - 1
        while True:
            while i < len(rows) and not rows[i].in_prefill:
                i += 1
            while j >= 0 and rows[j].in_prefill:
                j -= 1
            if i >= j:
                break
            ops.append(("swap_row", (i, j)))
            rows[i], rows[j] = rows[j], rows[i]

    def step(self) -> Step:
        """Advance one scheduler step and return its row operations."""
        ops: list[tuple[str, tuple[Any, ...]]] = []
        finished = self.finish_and_condense(ops)
        budget = self.schedule_running(ops)  # running requests first
        self._arrive()
        admitted, budget = self._admit(ops, budget)
        return self.advance(ops, finished, admitted)

    def live_pages(self) -> list[list[int]]:
        """Page ids per group held by the live requests (for the no-double-use check)."""
        return [[p for r in self.rows for p in r.pages[g]] for g in range(len(self.page_sizes))]
