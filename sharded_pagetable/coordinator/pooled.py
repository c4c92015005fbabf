"""Row operations of a sharded table with KV-local page pools (``pages_per_shard``).

Every row operation first checks that each page id it would give a row lies in that row's
shard's pool (:class:`~sharded_pagetable.routing.pools.PagePools`), then runs the ordinary
operation; a refused call changes nothing. Without pools they are the ordinary ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..routing.pools import PagePools
from ..table.host import PageIds
from ..table.row_ops import MultiGroupRowOps
from ..table.validation import check_list, group_lists
from .view import synchronized, when_open


class PooledRowOps(MultiGroupRowOps):
    """:class:`MultiGroupRowOps` that keeps every row's pages in its own shard's pool."""

    _pools: PagePools | None = None

    def _check_pool(self, row_idx: object, page_ids: object) -> None:
        """Refuse page ids outside the row's pool (after the checks every row op makes)."""
        hosts = self._hosts
        row = hosts[0].check_row(row_idx)
        for g, (host, ids) in enumerate(zip(hosts, group_lists(page_ids, len(hosts)), strict=True)):
            self._pools.check(row, host.check_ids(ids), g)

    def _refuse_crossing(self, op: str, src: object, tgt: object) -> None:
        """With pools, a row cannot keep its page ids on another shard."""
        a, b = self._hosts[0].check_row(src, "src"), self._hosts[0].check_row(tgt, "tgt")
        pools = self._pools
        if not pools.crosses(a, b):
            return
        need = [int(h.counts[a]) for h in self._hosts]
        msg = (
            f"{op}({a}, {b}) crosses shards {pools.shard_of_row(a)} -> {pools.shard_of_row(b)} "
            f"with page pools: row {b} needs pages of its own pool "
            f"[{pools.pool_of_row(b).start}, {pools.pool_of_row(b).stop}): {need} per group"
        )
        if op == "swap_row":
            need_b = [int(h.counts[b]) for h in self._hosts]
            pool_a = pools.pool_of_row(a)
            msg += f", and row {a} needs {need_b} per group of [{pool_a.start}, {pool_a.stop})"
        raise ValueError(msg + "; a row may only point at pages its own shard holds")

    def append_row(self, page_ids: Sequence[PageIds], row_idx: int) -> None:
        if self._pools is not None:
            self._check_pool(row_idx, page_ids)
        super().append_row(page_ids, row_idx)

    def add_row(self, page_ids: Sequence[PageIds], row_idx: int) -> None:
        if self._pools is not None:
            self._check_pool(row_idx, page_ids)
        super().add_row(page_ids, row_idx)

    def append_rows_batch(
        self, page_ids_per_req: Sequence[Sequence[PageIds]], req_indices: Sequence[int]
    ) -> None:
        if self._pools is not None:
            per_req = check_list(page_ids_per_req, "page_ids_per_req")
            rows = check_list(req_indices, "req_indices")
            if len(per_req) == len(rows):
                for row, page_ids in zip(rows, per_req, strict=True):
                    self._check_pool(row, page_ids)
        super().append_rows_batch(page_ids_per_req, req_indices)

    def move_row(self, src: int, tgt: int) -> None:
        if self._pools is not None:
            self._refuse_crossing("move_row", src, tgt)
        super().move_row(src, tgt)

    def swap_row(self, src: int, tgt: int) -> None:
        if self._pools is not None:
            self._refuse_crossing("swap_row", src, tgt)
        super().swap_row(src, tgt)


class GuardedRowOps(PooledRowOps):
    """Row operations serialised under the table's lock (scheduler threads may share a
    table) and refused once the table is closed."""

    append_row = when_open(PooledRowOps.append_row)
    add_row = when_open(PooledRowOps.add_row)
    clear_row = when_open(PooledRowOps.clear_row)
    move_row = when_open(PooledRowOps.move_row)
    swap_row = when_open(PooledRowOps.swap_row)
    append_rows_batch = when_open(PooledRowOps.append_rows_batch)
    compute_slot_mapping = synchronized(PooledRowOps.compute_slot_mapping)
