"""compute_slot_mapping on MultiGroupPageTable and ShardedPageTable against a per-token
Python reference, plus every documented error (and that errors change nothing)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharded_pagetable as sp

ROWS, MAX_LEN, MAX_TOKENS = 16, 256, 64
PAGE_SIZES = (16, 64, 3)  # 3: a page size that is not a power of two
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)
INT32_MAX = 2**31 - 1

_TABLES: dict[str, object] = {}


def tables():
    """One single-process and one 2-shard table, built once per module (cheap to clear)."""
    if not _TABLES:
        _TABLES["multi"] = sp.MultiGroupPageTable(ROWS, MAX_LEN, MAX_TOKENS, PAGE_SIZES)
        _TABLES["sharded"] = sp.ShardedPageTable(
            ROWS, MAX_LEN, MAX_TOKENS, PAGE_SIZES, num_shards=2
        )
    return _TABLES


@pytest.fixture(scope="module", autouse=True)
def _close_tables():
    yield
    sharded = _TABLES.pop("sharded", None)
    if sharded is not None:
        sharded.close()
    _TABLES.clear()


def reference_slots(rows_pages, page_size, req_indices, positions, max_tokens):
    """Per-token reference over Python lists: ``rows_pages[r]`` holds row r's page ids."""
    out = [sp.SLOT_MAPPING_PADDING_VAL] * max_tokens
    for i, (r, p) in enumerate(zip(req_indices, positions, strict=True)):
        out[i] = rows_pages[r][p // page_size] * page_size + p % page_size
    return np.array(out, dtype=np.int64)


def fill(table, contents):
    """``contents[g][r]``: page ids of row r in group g; every row is rewritten."""
    for r in range(ROWS):
        table.add_row([contents[g][r] for g in range(len(PAGE_SIZES))], r)


def state(table):
    return [
        (table[g].get_cpu_tensor().copy(), table[g].num_pages_per_row.copy())
        for g in range(len(table))
    ]


def assert_state_equal(before, after):
    for (t0, c0), (t1, c1) in zip(before, after, strict=True):
        np.testing.assert_array_equal(t0, t1)
        np.testing.assert_array_equal(c0, c1)


@st.composite
def scenario(draw):
    """Random row contents for every group and a batch of valid tokens for one group."""
    big_ids = draw(st.sampled_from([False, False, False, True]))
    id_max = INT32_MAX if big_ids else 2**31 // max(PAGE_SIZES) - 1
    page_id = st.integers(0, id_max)
    # Every group must be able to hold the row's tokens, so draw a token length per row and
    # derive each group's page count from it (as a scheduler would), plus some slack.
    lengths = draw(st.lists(st.integers(0, MAX_LEN), min_size=ROWS, max_size=ROWS))
    if not any(lengths):  # at least one row holds tokens
        lengths[draw(st.integers(0, ROWS - 1))] = draw(st.integers(1, MAX_LEN))
    contents = []
    for g, size in enumerate(PAGE_SIZES):
        rows = []
        for r in range(ROWS):
            need = sp.cdiv(lengths[r], size)
            extra = draw(st.integers(0, WIDTHS[g] - need))
            rows.append(draw(st.lists(page_id, min_size=need + extra, max_size=need + extra)))
        contents.append(rows)
    group = draw(st.integers(0, len(PAGE_SIZES) - 1))
    size = PAGE_SIZES[group]
    live = [r for r in range(ROWS) if contents[group][r]]
    # The empty batch has its own test. Tokens come from a drawn seed so batches are big.
    n = draw(st.sampled_from([MAX_TOKENS, MAX_TOKENS // 2, 1, 5, MAX_TOKENS - 1]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    req = [live[i] for i in rng.integers(0, len(live), n)]
    pos = [int(rng.integers(0, len(contents[group][r]) * size)) for r in req]
    as_array = draw(st.sampled_from(["list", "int32", "int64", "uint32"]))
    if as_array != "list":
        req, pos = np.asarray(req, dtype=as_array), np.asarray(pos, dtype=as_array)
    return contents, group, req, pos


@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario())
def test_matches_per_token_reference(case):
    contents, group, req, pos = case
    size = PAGE_SIZES[group]
    req_l = [int(x) for x in req]
    pos_l = [int(x) for x in pos]
    want = reference_slots(contents[group], size, req_l, pos_l, MAX_TOKENS)
    for name, table in tables().items():
        fill(table, contents)
        if want.max(initial=0) > INT32_MAX:
            with pytest.raises(ValueError, match="overflow"):
                table.compute_slot_mapping(group, req, pos)
            continue
        got = table.compute_slot_mapping(group, req, pos)
        assert isinstance(got, np.ndarray), name
        assert got.dtype == np.int32, name
        assert got.shape == (MAX_TOKENS,), name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert np.all(got[len(req_l) :] == sp.SLOT_MAPPING_PADDING_VAL), name


@pytest.fixture(params=["multi", "sharded"])
def table(request):
    """A table with known contents; its state is checked to be unchanged after each test."""
    t = tables()[request.param]
    t.clear()
    # Row r holds r % 4 pages (rows 0, 4, 8, 12 are empty) in every group.
    for r in range(ROWS):
        k = r % 4
        t.add_row([[100 * r + 10 * g + c for c in range(k)] for g in range(len(PAGE_SIZES))], r)
    t.commit(ROWS)
    before = state(t)
    snaps = [device(t, g) for g in range(len(t))]
    yield t
    assert_state_equal(before, state(t))
    for g in range(len(t)):
        np.testing.assert_array_equal(device(t, g), snaps[g])
    # Nothing became pending either: the next commit uploads nothing.
    receipt = t.commit(ROWS)
    assert receipt == 0 if isinstance(t, sp.MultiGroupPageTable) else not receipt.changed


def device(t, g):
    if isinstance(t, sp.ShardedPageTable):
        return t.device_snapshot(g)
    return np.asarray(t[g].get_device_tensor())


def test_known_contents(table):
    # Row 3 holds pages [300, 301, 302] in group 0 (size 16): position 17 is page 1, offset 1.
    got = table.compute_slot_mapping(0, [3, 3, 1], [0, 17, 15])
    want = [300 * 16 + 0, 301 * 16 + 1, 100 * 16 + 15]
    assert got[:3].tolist() == want
    assert np.all(got[3:] == sp.SLOT_MAPPING_PADDING_VAL)
    # Group 2 (size 3), row 2 holds [220, 221]: position 5 is page 1, offset 2.
    assert table.compute_slot_mapping(2, [2], [5])[0] == 221 * 3 + 2


def test_empty_batch_is_all_padding(table):
    for req, pos in (([], []), (np.empty(0, np.int32), np.empty(0, np.int64))):
        got = table.compute_slot_mapping(1, req, pos)
        assert got.dtype == np.int32 and got.shape == (MAX_TOKENS,)
        assert np.all(got == sp.SLOT_MAPPING_PADDING_VAL)


def test_full_batch_of_max_tokens(table):
    req = [3] * MAX_TOKENS
    pos = list(range(MAX_TOKENS)) * 1
    pos = [p % 48 for p in pos]  # row 3 holds 3 pages of 16 tokens in group 0
    got = table.compute_slot_mapping(0, req, pos)
    want = reference_slots({3: [300, 301, 302]}, 16, req, pos, MAX_TOKENS)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("group", "row", "position"),
    [
        (0, 3, 48),  # row 3 holds 3 pages of 16: position 48 needs page 3
        (0, 0, 0),  # row 0 holds no pages
        (1, 2, 128),  # 2 pages of 64
        (2, 1, 3),  # 1 page of 3
        (0, 3, -1),  # negative positions never wrap
        (0, 5, 10**12),
    ],
)
def test_position_past_held_pages_is_index_error(table, group, row, position):
    with pytest.raises(IndexError):
        table.compute_slot_mapping(group, [1, row], [0, position])


@pytest.mark.parametrize("row", [-1, -ROWS, ROWS, ROWS + 7, 2**40])
def test_row_out_of_range_is_index_error(table, row):
    with pytest.raises(IndexError):
        table.compute_slot_mapping(0, [1, row], [0, 0])
    with pytest.raises(IndexError):
        table.compute_slot_mapping(0, np.array([row], np.int64), np.array([0], np.int64))


def test_too_many_tokens_is_value_error(table):
    n = MAX_TOKENS + 1
    with pytest.raises(ValueError):
        table.compute_slot_mapping(0, [1] * n, [0] * n)


@pytest.mark.parametrize(
    ("req", "pos"),
    [([1, 1], [0]), ([1], [0, 0]), ([], [0]), (np.ones(3, np.int32), np.zeros(2, np.int32))],
)
def test_mismatched_lengths_is_value_error(table, req, pos):
    with pytest.raises(ValueError):
        table.compute_slot_mapping(0, req, pos)


@pytest.mark.parametrize(
    "pos",
    [[0.0], [1.5], np.array([0.0]), np.array([0], np.float32), [True], ["0"]],
)
def test_non_integer_positions_are_value_error(table, pos):
    with pytest.raises(ValueError):
        table.compute_slot_mapping(0, [1], pos)


@pytest.mark.parametrize("req", [[1.0], np.array([1.0]), [True]])
def test_non_integer_rows_are_value_error(table, req):
    with pytest.raises(ValueError):
        table.compute_slot_mapping(0, req, [0])


def test_two_dimensional_arguments_are_value_error(table):
    with pytest.raises(ValueError):
        table.compute_slot_mapping(0, [[1]], [[0]])


@pytest.mark.parametrize("group", [-1, len(PAGE_SIZES), 99])
def test_group_out_of_range_is_index_error(table, group):
    with pytest.raises(IndexError):
        table.compute_slot_mapping(group, [1], [0])


def test_slot_overflow_is_value_error():
    t = tables()["multi"]
    t.clear()
    t.add_row([[INT32_MAX], [0], [0]], 0)
    before = state(t)
    with pytest.raises(ValueError, match="overflow"):
        t.compute_slot_mapping(0, [0], [1])
    assert_state_equal(before, state(t))


@pytest.mark.parametrize("kind", ["multi", "sharded"])
def test_large_batch_on_large_table_matches_reference(kind):
    """8192 tokens over a 1024-row table: the vectorised result equals the per-token loop."""
    rows, max_len, tokens, sizes = 1024, 1024, 8192, (16, 64)
    if kind == "multi":
        t = sp.MultiGroupPageTable(rows, max_len, tokens, sizes)
    else:
        t = sp.ShardedPageTable(rows, max_len, tokens, sizes, num_shards=2)
    try:
        rng = np.random.default_rng(7)
        lengths = rng.integers(1, max_len + 1, rows)
        contents = []
        for size in sizes:
            per_row = []
            for r in range(rows):
                n = sp.cdiv(int(lengths[r]), size)
                per_row.append([int(x) for x in rng.integers(0, 2**31 // 64, n)])
            contents.append(per_row)
        for r in range(rows):
            t.add_row([contents[0][r], contents[1][r]], r)
        req = rng.integers(0, rows, tokens).astype(np.int32)
        pos = (rng.random(tokens) * lengths[req]).astype(np.int32)
        for g, size in enumerate(sizes):
            got = t.compute_slot_mapping(g, req, pos)
            want = reference_slots(contents[g], size, req.tolist(), pos.tolist(), tokens)
            assert got.dtype == np.int32 and got.shape == (tokens,)
            np.testing.assert_array_equal(got, want)
    finally:
        if kind == "sharded":
            t.close()
