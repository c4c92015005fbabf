"""baselines for benchmarks only: reproduce the seed's algorithm and its defects on purpose.

Nothing is validated, a row's count is raised before its pages are written, slots past a
row's count keep stale ids, and a commit re-uploads the first ``num_reqs`` rows with an eager,
non-donated ``.at[:n].set`` on one device. Do not use these classes to serve requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..constants import cdiv


class SeedStylePageTable:
    """One KV-cache group: numpy host table plus one device copy refreshed by ``commit``."""

    def __init__(
        self, max_num_reqs: int, max_num_pages_per_req: int, max_num_batched_tokens: int
    ) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_num_pages_per_req = max_num_pages_per_req
        self.max_num_batched_tokens = max_num_batched_tokens
        shape = (max_num_reqs, max_num_pages_per_req)
        self.page_table: jax.Array = jnp.zeros(shape, dtype=jnp.int32)
        self.page_table_cpu = np.zeros(shape, dtype=np.int32)
        self.num_pages_per_row = np.zeros(max_num_reqs, dtype=np.int32)

    def append_row(self, page_ids: list[int], row_idx: int) -> None:
        if not page_ids:
            return
        count = len(page_ids)
        start = self.num_pages_per_row[row_idx]
        self.num_pages_per_row[row_idx] += count  # bumped first: a bad write leaves it wrong
        self.page_table_cpu[row_idx, start : start + count] = page_ids

    def add_row(self, page_ids: list[int], row_idx: int) -> None:
        self.num_pages_per_row[row_idx] = 0  # old ids past the new count stay (stale)
        self.append_row(page_ids, row_idx)

    def clear_row(self, row_idx: int) -> None:
        """Not in the seed; what ``add_row([], row_idx)`` does there (ids left stale)."""
        self.num_pages_per_row[row_idx] = 0

    def move_row(self, src: int, tgt: int) -> None:
        count = self.num_pages_per_row[src]
        self.page_table_cpu[tgt, :count] = self.page_table_cpu[src, :count]
        self.num_pages_per_row[tgt] = count

    def swap_row(self, src: int, tgt: int) -> None:
        counts = self.num_pages_per_row
        counts[src], counts[tgt] = counts[tgt], counts[src]
        self.page_table_cpu[[src, tgt]] = self.page_table_cpu[[tgt, src]]

    def commit(self, num_reqs: int) -> None:
        self.page_table = self.page_table.at[:num_reqs].set(self.page_table_cpu[:num_reqs])

    def clear(self) -> None:
        self.page_table = jnp.zeros_like(self.page_table)
        self.page_table_cpu.fill(0)
        self.num_pages_per_row.fill(0)

    def get_device_tensor(self) -> jax.Array:
        return self.page_table

    def get_cpu_tensor(self) -> np.ndarray:
        return self.page_table_cpu


class SeedStyleMultiGroupPageTable:
    """One :class:`SeedStylePageTable` per group; ``page_ids`` arguments are ``[group][pages]``."""

    def __init__(
        self,
        max_num_reqs: int,
        max_model_len: int,
        max_num_batched_tokens: int,
        page_sizes: Sequence[int],
    ) -> None:
        self.page_tables = [
            SeedStylePageTable(max_num_reqs, cdiv(max_model_len, size), max_num_batched_tokens)
            for size in page_sizes
        ]

    def append_row(self, page_ids: Sequence[list[int]], row_idx: int) -> None:
        for g, table in enumerate(self.page_tables):
            table.append_row(page_ids[g], row_idx)

    def add_row(self, page_ids: Sequence[list[int]], row_idx: int) -> None:
        for g, table in enumerate(self.page_tables):
            table.add_row(page_ids[g], row_idx)

    def clear_row(self, row_idx: int) -> None:
        for table in self.page_tables:
            table.clear_row(row_idx)

    def move_row(self, src: int, tgt: int) -> None:
        for table in self.page_tables:
            table.move_row(src, tgt)

    def swap_row(self, src: int, tgt: int) -> None:
        for table in self.page_tables:
            table.swap_row(src, tgt)

    def append_rows_batch(
        self, page_ids_per_req: Sequence[Sequence[list[int]]], req_indices: Sequence[int]
    ) -> None:
        for row_idx, per_group in zip(req_indices, page_ids_per_req, strict=True):
            self.append_row(per_group, row_idx)

    def commit(self, num_reqs: int) -> None:
        for table in self.page_tables:
            table.commit(num_reqs)

    def clear(self) -> None:
        for table in self.page_tables:
            table.clear()

    def __getitem__(self, idx: int) -> SeedStylePageTable:
        return self.page_tables[idx]

    def __len__(self) -> int:
        return len(self.page_tables)
