"""Single-process page tables: the seed's API with validation and dirty-row commits."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from ..constants import cdiv
from ..rows.device import DeviceRows, assemble
from .host import HostRows, HostView, PageIds
from .row_ops import MultiGroupRowOps
from .validation import check_count


class PageTable(HostView):
    """Page ids of every request row for one KV-cache group, on the host and on devices.

    Row operations change the host table only; :meth:`commit` is the one point that touches
    devices, and it uploads only the rows changed since they were last published.

    Args:
      max_num_reqs: rows (concurrent requests).
      max_num_pages_per_req: pages a row can hold.
      max_num_batched_tokens: per-step token budget (kept for the seed's API and slot mapping).
      sharding: layout of the device table, e.g. ``NamedSharding(mesh, P("data", None))`` or
        replicated ``NamedSharding(mesh, P())`` (what EasyDeL's eSurge passes); default: the
        first device. Fourth positional argument, as in EasyDeL 0.3.0.
      num_pages: if given, page ids must be below it.
      warmup: compile the device update for every bucket size now.

    Example::

      t = PageTable(8, 4, 64)
      t.append_row([3, 5], row_idx=0)
      t.commit(1)          # device row 0 is now [3, 5, 0, 0]
    """

    def __init__(
        self,
        max_num_reqs: int,
        max_num_pages_per_req: int,
        max_num_batched_tokens: int,
        sharding: jax.sharding.Sharding | None = None,
        *,
        num_pages: int | None = None,
        warmup: bool = True,
    ) -> None:
        for name, value in (
            ("max_num_reqs", max_num_reqs),
            ("max_num_pages_per_req", max_num_pages_per_req),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            check_count(value, 2**31 - 1, name)
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_pages is not None and check_count(num_pages, 2**31, "num_pages") < 1:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError(f"sharding must be a jax.sharding.Sharding or None, got {sharding!r}")
        self.max_num_reqs = max_num_reqs
        self.max_num_pages_per_req = max_num_pages_per_req
        self.max_num_batched_tokens = max_num_batched_tokens
        super().__init__(HostRows(max_num_reqs, max_num_pages_per_req, num_pages))
        self._shape = (max_num_reqs, max_num_pages_per_req)
        self._sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self._device = DeviceRows(self._shape, self._sharding, self._host.table, warmup=warmup)
        self._array: jax.Array | None = None  # the assembled global array, until a commit

    # The seed exposes these as attributes; they are the live host arrays.
    def append_row(self, page_ids: PageIds, row_idx: int) -> None:
        """Append ``page_ids`` after the row's current pages."""
        host = self._host
        host.checked_append(host.check_row(row_idx), host.check_ids(page_ids))

    def add_row(self, page_ids: PageIds, row_idx: int) -> None:
        """Replace the row with ``page_ids``; slots past them become padding."""
        host = self._host
        row = host.check_row(row_idx)
        ids = host.check_ids(page_ids)
        host.check_room(row, len(ids), 0)
        host.replace(row, ids)

    def clear_row(self, row_idx: int) -> None:
        """Empty the row."""
        self._host.clear_row(self._host.check_row(row_idx))

    def move_row(self, src: int, tgt: int) -> None:
        """Copy row ``src`` onto ``tgt`` (``src`` keeps its pages)."""
        host = self._host
        host.copy_row(host.check_row(src, "src"), host.check_row(tgt, "tgt"))

    def swap_row(self, src: int, tgt: int) -> None:
        """Exchange two rows and their counts."""
        host = self._host
        host.swap_rows(host.check_row(src, "src"), host.check_row(tgt, "tgt"))

    def commit(self, num_reqs: int) -> int:
        """Publish rows ``[0, num_reqs)`` to the device; returns how many rows were uploaded.

        Device rows at or past ``num_reqs`` keep what they last held; their pending changes
        go out with a later commit that covers them.
        """
        return self.publish(check_count(num_reqs, self.max_num_reqs, "num_reqs"))

    @property
    def host(self) -> HostRows:
        """This group's host rows (what :class:`MultiGroupPageTable` drives its row ops on)."""
        return self._host

    def publish(self, n: int) -> int:
        """:meth:`commit` of an already checked ``n``; returns rows uploaded."""
        host = self._host
        batch = host.batch(n)
        if batch.size:
            r, c = host.changed_cells(batch)
            self._device.update_cells(r, c, host.table, whole_below=n)
            host.settle(batch)
            self._array = None
        return batch.size

    def clear(self) -> None:
        """Empty every row on the host and on the device."""
        self._host.reset_published()
        self._device.reset(self._host.table)
        self._array = None

    def get_device_tensor(self) -> jax.Array:
        """``i32[R, P]`` device table as of the last commit.

        Its buffers are donated to the next commit that uploads rows: read it again after
        every commit instead of keeping it.
        """
        if self._array is None:
            self._array = assemble(self._shape, self._sharding, self._device.buffers())
        return self._array


class MultiGroupPageTable(MultiGroupRowOps):
    """One :class:`PageTable` per KV-cache group, driven together.

    Group ``g`` holds ``cdiv(max_model_len, page_sizes[g])`` pages per row; ``page_ids``
    arguments are ``[group][pages]`` and ``append_rows_batch`` takes
    ``[request][group][pages]``, as in the seed. The constructor accepts EasyDeL 0.3.0's call
    forms, ``sharding`` included (fifth positional argument or keyword), and ``t[g]``
    exposes ``cpu_version``.

    Example::

      t = MultiGroupPageTable(64, 4096, 2048, page_sizes=[16, 64])
      t.add_row([[1, 2], [7]], row_idx=0)
      t.commit(1)
    """

    def __init__(
        self,
        max_num_reqs: int,
        max_model_len: int,
        max_num_batched_tokens: int,
        page_sizes: Sequence[int],
        sharding: jax.sharding.Sharding | None = None,
        *,
        num_pages: int | None = None,
        warmup: bool = True,
    ) -> None:
        page_sizes = check_page_sizes(page_sizes)
        check_count(max_model_len, 2**31 - 1, "max_model_len")
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.page_tables = [
            PageTable(
                max_num_reqs,
                cdiv(max_model_len, size),
                max_num_batched_tokens,
                num_pages=num_pages,
                sharding=sharding,
                warmup=warmup,
            )
            for size in page_sizes
        ]
        super().__init__([t.host for t in self.page_tables], page_sizes, max_num_batched_tokens)

    def commit(self, num_reqs: int) -> int:
        """Publish rows ``[0, num_reqs)`` of every group; returns rows uploaded in total."""
        n = check_count(num_reqs, self.max_num_reqs, "num_reqs")
        return sum(table.publish(n) for table in self.page_tables)

    def clear(self) -> None:
        for t in self.page_tables:
            t.clear()

    def __getitem__(self, idx: int) -> PageTable:
        return self.page_tables[idx]

    def __len__(self) -> int:
        return len(self.page_tables)


def check_page_sizes(page_sizes: Sequence[int]) -> tuple[int, ...]:
    """Page sizes as a non-empty tuple of positive ints."""
    if isinstance(page_sizes, int | str) or len(page_sizes) == 0:
        raise ValueError(f"page_sizes must be a non-empty list of ints, got {page_sizes!r}")
    for size in page_sizes:
        if check_count(size, 2**31 - 1, "page size") < 1:
            raise ValueError(f"page sizes must be positive, got {size}")
    return tuple(int(s) for s in page_sizes)
