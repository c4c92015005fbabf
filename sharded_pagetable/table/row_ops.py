"""Multi-group row operations shared by the single-process and the sharded table.

Each public method validates its whole call across every KV-cache group before it writes
anything, so a refused call leaves every group exactly as it was. It reads each of the
caller's lists once, into the copies it validates and then writes (``_check_ids``), so a
list another thread changes meanwhile cannot put an unchecked id in the table. The tables
built on it add their one side-effect point, ``commit``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .host import HostRows, PageIds
from .slot_mapping import compute_slot_mapping
from .validation import check_index, check_list, group_lists, read_once


class MultiGroupRowOps:
    """The seed's ``MultiGroupPageTable`` row API over one :class:`HostRows` per group.

    Args:
      hosts: each KV-cache group's rows (they all have the same number of rows).
      page_sizes: tokens per page of each group.
      max_num_batched_tokens: the per-step token budget (slot mapping).
    """

    def __init__(
        self, hosts: Sequence[HostRows], page_sizes: Sequence[int], max_num_batched_tokens: int
    ) -> None:
        self._hosts = list(hosts)
        self.page_sizes = tuple(page_sizes)
        self.max_num_batched_tokens = max_num_batched_tokens

    @property
    def num_groups(self) -> int:
        return len(self._hosts)

    def _check_ids(self, group: int, row: int, page_ids: object) -> PageIds:
        """Group ``group``'s page ids for ``row``: read once into the validated copy that
        is then written, so what was checked is what the table holds even if the caller's
        list changes meanwhile. Subclasses extend this with checks of their own (page
        pools) on that same copy, never on a second read of the caller's list."""
        return self._hosts[group].check_ids(page_ids)

    def _check_groups(self, page_ids: object, row: int, *, replace: bool) -> list[PageIds]:
        """Every group's validated copy of ``page_ids[g]`` for ``row``, with room for them
        (in place of the row's pages with ``replace``, else after them)."""
        checked = []
        for g, ids in enumerate(group_lists(page_ids, len(self._hosts))):
            ids = self._check_ids(g, row, ids)
            self._hosts[g].check_room(row, len(ids), 0 if replace else None)
            checked.append(ids)
        return checked

    def append_row(self, page_ids: Sequence[PageIds], row_idx: int) -> None:
        """Append ``page_ids[g]`` to row ``row_idx`` of every group ``g``."""
        hosts = self._hosts
        row = hosts[0].check_row(row_idx)
        groups = page_ids.copy() if type(page_ids) is list else None  # the hot path
        if groups is not None and len(groups) == len(hosts):
            check = self._check_ids
            checked = [check(g, row, ids) for g, ids in enumerate(groups)]
            for host, ids in zip(hosts, checked):  # noqa: B905
                host.check_room(row, len(ids))
        else:
            checked = self._check_groups(page_ids if groups is None else groups, row, replace=False)
        for host, ids in zip(hosts, checked, strict=True):
            host.append(row, ids)

    def add_row(self, page_ids: Sequence[PageIds], row_idx: int) -> None:
        """Replace row ``row_idx`` of every group with ``page_ids[g]``."""
        row = self._hosts[0].check_row(row_idx)
        checked = self._check_groups(page_ids, row, replace=True)
        for host, ids in zip(self._hosts, checked, strict=True):
            host.replace(row, ids)

    def clear_row(self, row_idx: int) -> None:
        """Empty row ``row_idx`` in every group."""
        row = self._hosts[0].check_row(row_idx)
        for host in self._hosts:
            host.clear_row(row)

    def move_row(self, src: int, tgt: int) -> None:
        """Copy row ``src`` onto row ``tgt`` in every group; ``src`` keeps its pages."""
        src = self._hosts[0].check_row(src, "src")
        tgt = self._hosts[0].check_row(tgt, "tgt")
        for host in self._hosts:
            host.copy_row(src, tgt)

    def swap_row(self, src: int, tgt: int) -> None:
        """Exchange rows ``src`` and ``tgt`` (pages and counts) in every group."""
        src = self._hosts[0].check_row(src, "src")
        tgt = self._hosts[0].check_row(tgt, "tgt")
        for host in self._hosts:
            host.swap_rows(src, tgt)

    def append_rows_batch(
        self, page_ids_per_req: Sequence[Sequence[PageIds]], req_indices: Sequence[int]
    ) -> None:
        """Append ``page_ids_per_req[i][g]`` to row ``req_indices[i]`` of group ``g``.

        A row named twice receives both appends in order; capacity is checked for the total.
        """
        # Both outer lists are read once, like each list of ids below.
        page_ids_per_req = read_once(
            check_list(page_ids_per_req, "page_ids_per_req"), "page_ids_per_req"
        )
        req_indices = read_once(check_list(req_indices, "req_indices"), "req_indices")
        if len(page_ids_per_req) != len(req_indices):
            raise ValueError(
                f"append_rows_batch got {len(page_ids_per_req)} page-id lists for "
                f"{len(req_indices)} rows"
            )
        first = self._hosts[0]
        rows = [first.check_row(r) for r in req_indices]
        extra: dict[tuple[int, int], int] = {}
        checked: list[list[PageIds]] = []
        for row, per_group in zip(rows, page_ids_per_req, strict=True):
            ids_row = []
            for g, ids in enumerate(group_lists(per_group, len(self._hosts))):
                ids = self._check_ids(g, row, ids)
                key = (g, row)
                total = extra.get(key, 0) + len(ids)
                self._hosts[g].check_room(row, total)
                extra[key] = total
                ids_row.append(ids)
            checked.append(ids_row)
        for row, ids_row in zip(rows, checked, strict=True):
            for host, ids in zip(self._hosts, ids_row, strict=True):
                host.append(row, ids)

    def compute_slot_mapping(self, group: int, req_indices: object, positions: object):
        """``i32[max_num_batched_tokens]`` slots of the scheduled tokens in ``group``, from
        the host table (see :mod:`sharded_pagetable.table.slot_mapping`)."""
        host = self._hosts[check_index(group, len(self._hosts), "group")]
        rows = host.usable_rows  # a row past them is refused as on a table of that many
        return compute_slot_mapping(
            host.table[:rows],
            host.counts[:rows],
            self.page_sizes[int(group)],
            req_indices,
            positions,
            self.max_num_batched_tokens,
        )
