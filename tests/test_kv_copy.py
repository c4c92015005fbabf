"""apply_kv_copies: KV pages copied on a page-pooled global array, against a numpy model.

The reference is ``out = kv.copy(); out[dst] = kv[src]``. Layouts: one device, 1-D meshes of
2, 4 and 8 devices named "data", and a 2-D {"data": 4, "model": 2} mesh (pools replicated,
or heads split over "model"). The compiled program is checked to move pages only with
collective-permutes and to write the donated pool in place.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharded_pagetable.shard import kv_copy
from sharded_pagetable.shard.kv_copy import apply_kv_copies, check_copies, compiled_text

PAGES = 64  # 8 pages per pool on 8 devices, 32 on 2
PAGE = (2, 4, 8)  # [page_size, 2 * kv_heads, head_dim], small so every case compiles fast
PAGES_OVER_DATA = P("data")


def make_mesh(shape: dict[str, int]) -> jax.sharding.Mesh:
    n = int(np.prod(list(shape.values())))
    return jax.make_mesh(tuple(shape.values()), tuple(shape), devices=jax.devices()[:n])


def make_kv(
    layout: dict[str, int] | None,
    dtype=jnp.float32,
    spec: P = PAGES_OVER_DATA,
    seed: int = 0,
) -> tuple[jax.Array, np.ndarray]:
    """A KV array laid out as ``layout`` (None: one device) and its host copy."""
    host = np.random.default_rng(seed).standard_normal((PAGES, *PAGE)).astype(dtype)
    if layout is None:
        return jax.device_put(host, jax.devices()[0]), host
    return jax.device_put(host, NamedSharding(make_mesh(layout), spec)), host


def reference(host: np.ndarray, copies: np.ndarray) -> np.ndarray:
    out = host.copy()
    out[copies[1]] = host[copies[0]]
    return out


def pool_of(page: int, n: int) -> int:
    return page // (PAGES // n)


def plan(pairs: list[tuple[int, int]]) -> np.ndarray:
    return np.array(pairs, dtype=np.int32).reshape(-1, 2).T.copy()


def random_plan(rng: np.random.Generator, k: int) -> np.ndarray:
    pages = rng.permutation(PAGES)
    return np.stack([pages[:k], pages[k : 2 * k]]).astype(np.int32)


def check(kv: jax.Array, host: np.ndarray, copies: np.ndarray, **kw) -> jax.Array:
    sharding = kv.sharding
    out = apply_kv_copies(kv, copies, **kw)
    np.testing.assert_array_equal(np.asarray(out), reference(host, np.asarray(copies)))
    assert out.sharding.is_equivalent_to(sharding, out.ndim)
    assert out.dtype == host.dtype
    return out


LAYOUTS = [None, {"data": 2}, {"data": 4}, {"data": 8}, {"data": 4, "model": 2}]
IDS = ["one-device", "data2", "data4", "data8", "data4xmodel2"]

# Named plans over 64 pages; with 8 pools of 8 pages: 0-7 pool 0, 8-15 pool 1, ... 56-63 pool 7.
PLANS = {
    "one": [(3, 40)],
    "within-device": [(0, 5), (1, 6), (9, 14)],
    "neighbours-forward": [(0, 8), (1, 9), (17, 25)],
    "neighbours-backward": [(8, 0), (9, 1), (25, 17)],
    "far-both-directions": [(0, 63), (62, 2), (7, 32)],
    "mixed-many": [(0, 5), (1, 12), (20, 60), (61, 3), (33, 34), (44, 10), (50, 51), (28, 58)],
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("name", list(PLANS))
def test_named_plans_match_reference(layout, name):
    kv, host = make_kv(layout)
    check(kv, host, plan(PLANS[name]))


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_random_plans_match_reference(layout):
    rng = np.random.default_rng(7)
    kv, host = make_kv(layout)
    for k in (1, 2, 5, 17, 32):
        copies = random_plan(rng, k)
        kv = check(kv, host, copies)
        host = reference(host, copies)


def test_whole_pool_moves_to_the_farthest_pool():
    # Every page of pool 0 to pool 7 and back to pool 0's neighbour: the largest bucket.
    kv, host = make_kv({"data": 8})
    copies = plan([(p, 56 + p) for p in range(8)] + [(48 + p, 8 + p) for p in range(8)])
    check(kv, host, copies)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_dtypes(dtype):
    kv, host = make_kv({"data": 4}, dtype=dtype)
    check(kv, host, plan(PLANS["mixed-many"]))


def test_heads_split_over_a_second_axis():
    kv, host = make_kv({"data": 4, "model": 2}, spec=P("data", None, "model", None))
    check(kv, host, plan(PLANS["mixed-many"]))


def test_pages_not_split_is_one_pool():
    kv, host = make_kv({"data": 8}, spec=P())
    out = check(kv, host, plan(PLANS["mixed-many"]))
    assert "collective-permute" not in compiled_text(out, plan(PLANS["mixed-many"]))


def test_jax_array_plan_and_custom_row_axis():
    mesh = jax.make_mesh((4,), ("rows",), devices=jax.devices()[:4])
    host = np.random.default_rng(1).standard_normal((PAGES, *PAGE)).astype(np.float32)
    kv = jax.device_put(host, NamedSharding(mesh, P("rows")))
    copies = plan(PLANS["far-both-directions"])
    check(kv, host, jnp.asarray(copies), row_axis="rows")


@pytest.mark.parametrize("layout", [None, {"data": 8}], ids=["one-device", "data8"])
def test_donates_kv(layout):
    kv, _ = make_kv(layout)
    apply_kv_copies(kv, plan(PLANS["one"]))
    assert kv.is_deleted()


@pytest.mark.parametrize(
    "copies",
    [np.zeros((2, 0), np.int32), plan([(5, 5), (9, 9)])],
    ids=["K=0", "self-copies"],
)
def test_nothing_to_move_returns_kv_untouched(copies):
    kv, host = make_kv({"data": 8})
    assert apply_kv_copies(kv, copies) is kv
    assert not kv.is_deleted()
    np.testing.assert_array_equal(np.asarray(kv), host)
    assert compiled_text(kv, copies) == ""


def test_self_copy_is_dropped_from_a_plan():
    kv, host = make_kv({"data": 8})
    check(kv, host, plan([(5, 5), (0, 63)]))


BAD_PLANS = {
    "three-rows": (np.zeros((3, 2), np.int32), r"shape \[2, K\].*\(3, 2\)"),
    "one-dimensional": (np.array([1, 2], np.int32), r"shape \[2, K\].*\(2,\)"),
    "float": (np.array([[1.0], [2.0]]), r"integer array.*float64"),
    "bool": (np.array([[True], [False]]), r"integer array.*bool"),
    "negative-source": (plan([(1, 2), (-1, 3)]), r"copies\[0, 1\] = -1"),
    "destination-past-end": (plan([(1, PAGES)]), rf"copies\[1, 0\] = {PAGES}.*< {PAGES}"),
    "duplicate-destination": (plan([(1, 9), (2, 9)]), r"destination page 9 appears 2 times"),
    "chain": (plan([(1, 9), (9, 17)]), r"page 9 is both the source.*destination"),
}


@pytest.mark.parametrize("name", list(BAD_PLANS))
def test_bad_plans_refused_with_nothing_changed(name):
    copies, match = BAD_PLANS[name]
    kv, host = make_kv({"data": 8})
    with pytest.raises(ValueError, match=match):
        apply_kv_copies(kv, copies)
    assert not kv.is_deleted()
    np.testing.assert_array_equal(np.asarray(kv), host)


def test_bad_layouts_refused():
    kv, _ = make_kv({"data": 4, "model": 2}, spec=P("model"))
    with pytest.raises(ValueError, match=r"row_axis='data'.*P\('model'"):
        apply_kv_copies(kv, plan(PLANS["one"]))
    assert not kv.is_deleted()
    with pytest.raises(TypeError, match=r"jax\.Array; got ndarray"):
        apply_kv_copies(np.zeros((PAGES, *PAGE), np.float32), plan(PLANS["one"]))


def test_check_copies_returns_the_moving_pairs():
    src, dst = check_copies(plan([(1, 9), (4, 4), (2, 10)]), PAGES)
    assert src.tolist() == [1, 2] and dst.tolist() == [9, 10]


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-broadcast")


@pytest.mark.parametrize(
    "layout", [{"data": 8}, {"data": 4, "model": 2}], ids=["data8", "data4xmodel2"]
)
def test_hlo_moves_pages_only_point_to_point_in_place(layout):
    kv, _ = make_kv(layout)
    text = compiled_text(kv, plan(PLANS["mixed-many"]))
    assert "collective-permute" in text
    for op in COLLECTIVES:
        assert op not in text, op
    # The donated pool is written in place: no copy of a whole per-device block.
    block = f"f32[{PAGES // layout['data']},{','.join(map(str, PAGE))}]"
    copies = [line for line in text.splitlines() if re.search(r"\bcopy\(", line)]
    assert not [line for line in copies if f"= {block}" in line], copies
    assert "input_output_alias={ {}: (0, {}" in text


@pytest.fixture
def compiles():
    """The names of the XLA programs compiled while the test runs."""
    names: list[str] = []

    def listen(event: str, _secs: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(str(kw.get("fun_name", "")))

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield names
    jax.monitoring.unregister_event_duration_listener(listen)


def test_compiles_once_per_shift_set_and_bucket(compiles):
    # Same distances {1, 7}, same buckets; different pages, sizes and input sharding specs
    # (the first input says P("data"), later ones P("data", None, None, None)).
    mesh = make_mesh({"data": 8})
    host = np.random.default_rng(3).standard_normal((PAGES, 3, 4, 8)).astype(np.float32)
    kv = jax.device_put(host, NamedSharding(mesh, P("data")))
    plans = [
        plan([(0, 8), (9, 1)]),
        plan([(16, 24), (25, 17), (26, 18)]),
        plan([(40, 48), (57, 49)]),
    ]
    before = kv_copy._compiled.cache_info()
    for copies in plans:
        kv = check(kv, host, copies)
        host = reference(host, copies)
    after = kv_copy._compiled.cache_info()
    assert after.misses - before.misses <= 1
    assert after.hits - before.hits >= 2
    assert len([name for name in compiles if "copy_block" in name]) == 1, compiles


def test_plan_layout_sends_each_page_once():
    # 8 pools of 8: pool 0 sends pages 0, 1 seven pools forward (to pool 7) and page 2 one
    # forward; pool 7 receives two pages over distance 7.
    src, dst = check_copies(plan([(0, 56), (1, 57), (2, 8), (3, 4)]), PAGES)
    p = kv_copy.plan_copies(src, dst, 8, 8)
    assert p.shifts == (1, 7)
    real = p.send < 8
    assert real.sum() == 3  # the local copy is not sent
    assert p.send[0, 1, :2].tolist() == [0, 1] and p.send[0, 0, 0] == 2
    assert (p.write[7, 2] < 8).sum() == 2 and (p.write[0, 2] < 8).sum() == 1
    assert p.write[0, :, 0].tolist() == [0, 3, 4]  # local: from this pool, page 3 to 4
