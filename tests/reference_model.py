"""A plain reference model of ``MultiGroupPageTable`` semantics, used as a test oracle.

The model is written from the project's design notes (the seed table's semantics and the
defects it must not repeat, as the README's "Semantics worth knowing" states them),
independently of the implementation, with the dullest data structures possible:

* ``host[g][r]`` is a Python list holding exactly the valid page ids of row ``r`` in group ``g``
  (its length *is* the row's count; everything past it is ``PAD`` by definition);
* ``device[g][r]`` is the same for the *published* device table: what the device array must hold
  after the commits seen so far. ``commit(n)`` copies host rows ``[0, n)`` into it; rows ``>= n``
  keep their old device content. ``clear()`` empties both.

The model knows nothing about shards, meshes or backends, so the same model checks a
``PageTable`` (one group), a ``MultiGroupPageTable`` and a ``ShardedPageTable``: they share the API.

Validation: ``expected_error(op, *args)`` predicts whether a call is bad, following those
rules, and returns ``None`` (valid call) or the exception type(s) the call may raise. The rules do
not fix an order between checks, so when a call has several defects every defect's type is
acceptable and a tuple is returned (usable with ``isinstance`` and ``pytest.raises``). A
``PageTableFullError`` is a ``ValueError``; when a call has another ``ValueError`` defect as well,
plain ``ValueError`` is expected.

The mutators (``append_row`` ...) only accept valid calls and raise ``ModelMisuseError`` otherwise,
so a test can never silently push a bad call into the oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sharded_pagetable.errors import PageTableFullError

PAD = 0  # PAGE_TABLE_PADDING_VAL
MAX_PAGE_ID = 2**31 - 1

OPS = (
    "append_row",
    "add_row",
    "clear_row",
    "move_row",
    "swap_row",
    "append_rows_batch",
    "commit",
    "clear",
)


class ModelMisuseError(AssertionError):
    """A test asked the model to apply a call that the model itself considers invalid."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- validation rules


def is_int_scalar(x: object) -> bool:
    """A Python int or a numpy integer; bools (Python or numpy) are not integers here."""
    if isinstance(x, (bool, np.bool_)):
        return False
    return isinstance(x, (int, np.integer))


def row_error(row: object, max_num_reqs: int) -> type[Exception] | None:
    """Spec: int or numpy integer (bool rejected) else ValueError; out of range -> IndexError."""
    if not is_int_scalar(row):
        return ValueError
    if int(row) < 0 or int(row) >= max_num_reqs:
        return IndexError
    return None


def page_id_values(page_ids: object) -> list[int] | None:
    """The page ids as Python ints, or None when the container or an element is not acceptable.

    Acceptable: a list or tuple whose elements are ints / numpy integers (not bools), or a 1-D
    numpy array with an integer dtype (signed or unsigned; not bool, not float, not object);
    an empty 1-D array of any dtype is an empty list.
    """
    if isinstance(page_ids, np.ndarray):
        # An empty 1-D array holds no bad value, whatever its dtype (np.array([]) is float64).
        if page_ids.ndim != 1 or (page_ids.size and page_ids.dtype.kind not in "iu"):
            return None
        return [int(v) for v in page_ids.tolist()]
    if isinstance(page_ids, (list, tuple)):
        values = []
        for v in page_ids:
            if not is_int_scalar(v):
                return None
            values.append(int(v))
        return values
    return None


def page_ids_error(page_ids: object, num_pages: int | None) -> type[Exception] | None:
    """Spec: floats / bools / strings -> ValueError; id < 0, id > 2**31-1, id >= num_pages too."""
    values = page_id_values(page_ids)
    if values is None:
        return ValueError
    limit = MAX_PAGE_ID if num_pages is None else min(MAX_PAGE_ID, num_pages - 1)
    for v in values:
        if v < 0 or v > limit:
            return ValueError
    return None


def combine_errors(errors: Sequence[type[Exception] | None]):
    """None, one exception type, or a tuple of acceptable exception types."""
    found = []
    for e in errors:
        if e is not None and e not in found:
            found.append(e)
    if ValueError in found and PageTableFullError in found:
        found.remove(PageTableFullError)
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    return tuple(sorted(found, key=lambda e: e.__name__))


# --------------------------------------------------------------------------- the model


class ReferenceModel:
    """Host rows, counts and the published device table of a (multi-group) page table."""

    def __init__(
        self,
        max_num_reqs: int,
        pages_per_row: Sequence[int],
        *,
        num_pages: int | Sequence[int] | None = None,
    ) -> None:
        self.max_num_reqs = int(max_num_reqs)
        self.pages_per_row = [int(p) for p in pages_per_row]
        self.num_groups = len(self.pages_per_row)
        if num_pages is None or isinstance(num_pages, int):
            self.num_pages = [num_pages] * self.num_groups
        else:
            self.num_pages = list(num_pages)
        self.host = [[[] for _ in range(self.max_num_reqs)] for _ in range(self.num_groups)]
        self.device = [[[] for _ in range(self.max_num_reqs)] for _ in range(self.num_groups)]
        # Rows that any accepted mutation touched since they were last published. An
        # implementation may upload such a row even if its content did not really change
        # (append of an empty list, move_row(r, r), ...), so this is an upper bound of the rows
        # a commit may send. Rows whose host content differs from the device are a lower bound.
        self.maybe_dirty: set[int] = set()

    @classmethod
    def for_multigroup(cls, max_num_reqs, max_model_len, page_sizes, *, num_pages=None):
        return cls(
            max_num_reqs,
            [cdiv(max_model_len, size) for size in page_sizes],
            num_pages=num_pages,
        )

    @classmethod
    def for_single(cls, max_num_reqs, max_num_pages_per_req, *, num_pages=None):
        return cls(max_num_reqs, [max_num_pages_per_req], num_pages=num_pages)

    # ----------------------------------------------------------------- small queries

    def count(self, group: int, row: int) -> int:
        return len(self.host[group][int(row)])

    def state(self):
        """A deep copy of the whole model state (for "nothing changed" assertions)."""
        return (
            [[list(r) for r in rows] for rows in self.host],
            [[list(r) for r in rows] for rows in self.device],
            set(self.maybe_dirty),
        )

    # ----------------------------------------------------------------- validators

    def _row_error(self, row):
        return row_error(row, self.max_num_reqs)

    def _groups_error(self, page_ids) -> type[Exception] | None:
        if not isinstance(page_ids, (list, tuple)):
            return ValueError
        if len(page_ids) != self.num_groups:
            return ValueError
        return None

    def _ids_errors(self, page_ids) -> list:
        return [page_ids_error(page_ids[g], self.num_pages[g]) for g in range(self.num_groups)]

    def check_append_row(self, page_ids, row):
        return self._check_row_write(page_ids, row, replace=False)

    def check_add_row(self, page_ids, row):
        return self._check_row_write(page_ids, row, replace=True)

    def _check_row_write(self, page_ids, row, *, replace: bool):
        errors = [self._row_error(row)]
        groups_error = self._groups_error(page_ids)
        errors.append(groups_error)
        if groups_error is None:
            id_errors = self._ids_errors(page_ids)
            errors.extend(id_errors)
            if errors[0] is None and not any(id_errors):
                for g in range(self.num_groups):
                    start = 0 if replace else self.count(g, row)
                    if start + len(page_id_values(page_ids[g])) > self.pages_per_row[g]:
                        errors.append(PageTableFullError)
        return combine_errors(errors)

    def check_clear_row(self, row):
        return combine_errors([self._row_error(row)])

    def check_move_row(self, src, tgt):
        return combine_errors([self._row_error(src), self._row_error(tgt)])

    def check_swap_row(self, src, tgt):
        return combine_errors([self._row_error(src), self._row_error(tgt)])

    def check_append_rows_batch(self, page_ids_per_req, req_indices):
        if not isinstance(page_ids_per_req, (list, tuple)):
            return ValueError
        if not isinstance(req_indices, (list, tuple, np.ndarray)):
            return ValueError
        req_indices = list(req_indices)
        errors = []
        if len(page_ids_per_req) != len(req_indices):
            errors.append(ValueError)
        errors.extend(self._row_error(row) for row in req_indices)
        for page_ids in page_ids_per_req:
            groups_error = self._groups_error(page_ids)
            errors.append(groups_error)
            if groups_error is None:
                errors.extend(self._ids_errors(page_ids))
        if not any(errors):
            # Duplicate rows accumulate, so capacity is checked on the running counts.
            running = {}
            for page_ids, row in zip(page_ids_per_req, req_indices, strict=True):
                for g in range(self.num_groups):
                    key = (g, int(row))
                    before = running.get(key, self.count(g, row))
                    running[key] = before + len(page_id_values(page_ids[g]))
                    if running[key] > self.pages_per_row[g]:
                        errors.append(PageTableFullError)
        return combine_errors(errors)

    def check_commit(self, num_reqs):
        if not is_int_scalar(num_reqs):
            return ValueError
        if int(num_reqs) < 0 or int(num_reqs) > self.max_num_reqs:
            return ValueError
        return None

    def check_clear(self):
        return None

    def expected_error(self, op: str, *args):
        """None if ``op(*args)`` is a valid call, else the exception type(s) it must raise."""
        if op not in OPS:
            raise ModelMisuseError(f"unknown op {op!r}")
        return getattr(self, "check_" + op)(*args)

    # ----------------------------------------------------------------- mutators (valid only)

    def _require_valid(self, op, *args):
        error = self.expected_error(op, *args)
        if error is not None:
            raise ModelMisuseError(f"{op}{args!r} is invalid (expected {error}); not applied")

    def append_row(self, page_ids, row):
        self._require_valid("append_row", page_ids, row)
        row = int(row)
        for g in range(self.num_groups):
            self.host[g][row].extend(page_id_values(page_ids[g]))
        self.maybe_dirty.add(row)

    def add_row(self, page_ids, row):
        self._require_valid("add_row", page_ids, row)
        row = int(row)
        for g in range(self.num_groups):
            self.host[g][row] = list(page_id_values(page_ids[g]))
        self.maybe_dirty.add(row)

    def clear_row(self, row):
        self._require_valid("clear_row", row)
        row = int(row)
        for g in range(self.num_groups):
            self.host[g][row] = []
        self.maybe_dirty.add(row)

    def move_row(self, src, tgt):
        """Copy: the source keeps its pages; the target gets the source's pages and count."""
        self._require_valid("move_row", src, tgt)
        src, tgt = int(src), int(tgt)
        for g in range(self.num_groups):
            self.host[g][tgt] = list(self.host[g][src])
        self.maybe_dirty.update((src, tgt))

    def swap_row(self, src, tgt):
        self._require_valid("swap_row", src, tgt)
        src, tgt = int(src), int(tgt)
        for g in range(self.num_groups):
            a = self.host[g][src]
            b = self.host[g][tgt]
            self.host[g][src] = b
            self.host[g][tgt] = a
        self.maybe_dirty.update((src, tgt))

    def append_rows_batch(self, page_ids_per_req, req_indices):
        """Sequential appends, one request after the other (duplicate rows accumulate)."""
        self._require_valid("append_rows_batch", page_ids_per_req, req_indices)
        for page_ids, row in zip(page_ids_per_req, list(req_indices), strict=True):
            row = int(row)
            for g in range(self.num_groups):
                self.host[g][row].extend(page_id_values(page_ids[g]))
            self.maybe_dirty.add(row)

    def rows_that_must_upload(self, num_reqs: int) -> set[int]:
        """Rows in [0, num_reqs) whose host content differs from the device in some group."""
        rows = set()
        for g in range(self.num_groups):
            for r in range(int(num_reqs)):
                if self.host[g][r] != self.device[g][r]:
                    rows.add(r)
        return rows

    def rows_that_may_upload(self, num_reqs: int) -> set[int]:
        """Rows in [0, num_reqs) that an accepted mutation touched since they were published."""
        return {r for r in self.maybe_dirty if r < int(num_reqs)}

    def commit(self, num_reqs):
        """Publish host rows [0, num_reqs); device rows >= num_reqs keep what they held."""
        self._require_valid("commit", num_reqs)
        num_reqs = int(num_reqs)
        for g in range(self.num_groups):
            for r in range(num_reqs):
                self.device[g][r] = list(self.host[g][r])
        self.maybe_dirty = {r for r in self.maybe_dirty if r >= num_reqs}

    def clear(self):
        """Zero host and device, every group."""
        for g in range(self.num_groups):
            for r in range(self.max_num_reqs):
                self.host[g][r] = []
                self.device[g][r] = []
        # Host and device agree again, but an implementation may still consider rows pending;
        # be lenient about how many rows the next commit reports.
        self.maybe_dirty = set(range(self.max_num_reqs))

    def apply(self, op: str, *args):
        """Apply a valid call to the model (``ModelMisuseError`` if it is not valid)."""
        if op not in OPS:
            raise ModelMisuseError(f"unknown op {op!r}")
        return getattr(self, op)(*args)

    # ----------------------------------------------------------------- rendering

    def _render(self, rows, group: int) -> np.ndarray:
        out = np.full((self.max_num_reqs, self.pages_per_row[group]), PAD, dtype=np.int32)
        for r, pages in enumerate(rows):
            for c, page in enumerate(pages):
                out[r, c] = page
        return out

    def host_array(self, group: int) -> np.ndarray:
        """The expected ``get_cpu_tensor()`` of ``group``: int32 [R, P], padded with 0."""
        return self._render(self.host[group], group)

    def counts_array(self, group: int) -> np.ndarray:
        """The expected ``num_pages_per_row`` of ``group``: int32 [R]."""
        return np.array([len(r) for r in self.host[group]], dtype=np.int32)

    def device_array(self, group: int) -> np.ndarray:
        """The expected device table of ``group`` after the commits so far: int32 [R, P]."""
        return self._render(self.device[group], group)

    def device_counts_array(self, group: int) -> np.ndarray:
        """Counts of the rows as last published (for the device tail-padding check)."""
        return np.array([len(r) for r in self.device[group]], dtype=np.int32)
