"""Row operations of a sharded table with KV-local page pools (``pages_per_shard``).

Every row operation checks that each page id it would give a row lies in that row's shard's
pool (:class:`~sharded_pagetable.routing.pools.PagePools`), on the same validated copy of the
caller's ids that it writes (``_check_ids``); a refused call changes nothing. Without pools
they are the ordinary ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..routing.pools import PagePools
from ..table.host import HostRows, PageIds
from ..table.row_ops import MultiGroupRowOps
from ..table.validation import group_lists


class PooledRowOps(MultiGroupRowOps):
    """:class:`MultiGroupRowOps` that keeps every row's pages in its own shard's pool.

    Args:
      hosts, page_sizes, max_num_batched_tokens: as for :class:`MultiGroupRowOps`.
      pools: the shards' page pools, or None (page ids are global).
    """

    def __init__(
        self,
        hosts: Sequence[HostRows],
        page_sizes: Sequence[int],
        max_num_batched_tokens: int,
        pools: PagePools | None,
    ) -> None:
        super().__init__(hosts, page_sizes, max_num_batched_tokens)
        self._pools = pools

    def _check_ids(self, group: int, row: int, page_ids: object) -> PageIds:
        """The validated copy of the ids (see :class:`MultiGroupRowOps`), refused unless
        each lies in ``row``'s pool: checked on the very copy the row op then writes."""
        ids = super()._check_ids(group, row, page_ids)
        if self._pools is not None:
            self._pools.check(row, ids, group)
        return ids

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

    def move_row(self, src: int, tgt: int, page_ids: Sequence[PageIds] | None = None) -> None:
        """Copy row ``src`` onto ``tgt`` (``src`` keeps its pages). With ``page_ids``
        (``[group][pages]``, as many per group as ``src`` holds, in ``tgt``'s pool) ``tgt``
        gets those pages instead, and the next commit asks the model step to copy the KV of
        ``src``'s pages into them: how a row crosses shards with KV-local pools."""
        if page_ids is None:
            if self._pools is not None:
                self._refuse_crossing("move_row", src, tgt)
            return super().move_row(src, tgt)
        hosts = self._hosts
        a, b = hosts[0].check_row(src, "src"), hosts[0].check_row(tgt, "tgt")
        new = self._check_new_pages(b, page_ids, [h.counts.item(a) for h in hosts])
        for host, ids in zip(hosts, new, strict=True):
            old = host.table[a, : host.counts.item(a)].tolist()
            host.replace(b, ids)
            host.record_copies(old, ids)

    def swap_row(
        self,
        src: int,
        tgt: int,
        page_ids: tuple[Sequence[PageIds], Sequence[PageIds]] | None = None,
    ) -> None:
        """Exchange rows ``src`` and ``tgt``. With ``page_ids=(for_src, for_tgt)`` each row
        gets new pages of its own pool (as many per group as the other row holds) and the
        next commit copies the KV across: a swap between shards with KV-local pools."""
        if page_ids is None:
            if self._pools is not None:
                self._refuse_crossing("swap_row", src, tgt)
            return super().swap_row(src, tgt)
        hosts = self._hosts
        a, b = hosts[0].check_row(src, "src"), hosts[0].check_row(tgt, "tgt")
        pair = list(page_ids) if isinstance(page_ids, tuple | list) else None  # read once
        if pair is None or len(pair) != 2:
            raise ValueError("swap_row page_ids must be a pair (pages for src, pages for tgt)")
        if a == b:
            raise ValueError(f"swap_row({a}, {b}) with page_ids swaps a row with itself")
        for_a = self._check_new_pages(a, pair[0], [h.counts.item(b) for h in hosts])
        for_b = self._check_new_pages(b, pair[1], [h.counts.item(a) for h in hosts])
        for g, (host, x, y) in enumerate(zip(hosts, for_a, for_b, strict=True)):
            both = set(x) & set(y)
            if both:
                raise ValueError(f"page {min(both)} (group {g}) was given to both rows {a} and {b}")
            sources = set(host.table[a, : host.counts.item(a)].tolist())
            sources |= set(host.table[b, : host.counts.item(b)].tolist())
            reused = sources & (set(x) | set(y))
            if reused:
                raise ValueError(
                    f"page {min(reused)} (group {g}) is one whose KV this swap copies; the new "
                    "pages must be others (free the old ones after the next commit)"
                )
        for host, x, y in zip(hosts, for_a, for_b, strict=True):
            old_a = host.table[a, : host.counts.item(a)].tolist()
            old_b = host.table[b, : host.counts.item(b)].tolist()
            host.replace(a, x)
            host.replace(b, y)
            host.record_copies(old_b + old_a, x + y)

    def _check_new_pages(self, row: int, page_ids: object, need: list[int]) -> list[list[int]]:
        """``page_ids`` (``[group][pages]``) as the new pages of ``row``: ``need[g]`` valid,
        distinct ids per group, in the row's pool, held by no other live row."""
        hosts = self._hosts
        out = []
        for g, ids in enumerate(group_lists(page_ids, len(hosts))):
            host = hosts[g]
            ids = [int(p) for p in self._check_ids(g, row, ids)]  # in range and in the pool
            if len(ids) != need[g]:
                raise ValueError(
                    f"row {row} needs exactly {need[g]} new pages in group {g} (as many as the "
                    f"row whose KV it takes), got {len(ids)}"
                )
            if len(set(ids)) != len(ids):
                dup = next(p for p in ids if ids.count(p) > 1)
                raise ValueError(f"page {dup} appears twice in row {row}'s new pages (group {g})")
            busy = host.copy_sources() & set(ids)
            if busy:
                raise ValueError(
                    f"page {min(busy)} (group {g}) still holds KV a pending copy reads (a row "
                    "moved off it since the last commit); reuse it after the next commit"
                )
            holder = _holder(host, ids, row, self._pools)
            if holder is not None:
                raise ValueError(
                    f"page {holder[1]} (group {g}) is held by live row {holder[0]}; row {row} "
                    "needs free pages"
                )
            out.append(ids)
        return out


def _holder(
    host: HostRows, ids: list[int], row: int, pools: PagePools | None
) -> tuple[int, int] | None:
    """``(row, page)`` of a live row other than ``row`` holding one of ``ids`` (rows of
    ``row``'s shard when there are pools: no other shard can hold its pages)."""
    if not ids:
        return None
    lo, hi = 0, host.num_rows
    if pools is not None:
        shard = pools.shard_of_row(row)
        lo, hi = shard * pools.rows_per_shard, (shard + 1) * pools.rows_per_shard
    table, counts = host.table[lo:hi], host.counts[lo:hi]
    held = np.arange(table.shape[1])[None, :] < counts[:, None]
    if lo <= row < hi:
        held[row - lo] = False
    hit = held & np.isin(table, np.asarray(ids, np.int32))
    if not hit.any():
        return None
    r, c = np.argwhere(hit)[0]
    return int(r) + lo, int(table[r, c])
