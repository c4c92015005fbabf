"""Drop-in for EasyDeL 0.3.0's page table, checked against the real class (issue 10, item 5).

The real ``easydel/inference/esurge/page_table.py`` is taken from the published wheel at test
time (``pip download --no-deps``, hash-pinned) and loaded by path with a stub
``eformer.loggings``: it imports only jax, numpy and that logger. The same random operations
then run on it and on ours, and host tables, counts, committed device tables and
``cpu_version`` are compared after every operation.
"""

from __future__ import annotations

import importlib.util
import inspect
import random
import subprocess
import sys
import types
import zipfile

import jax
import numpy as np
import pytest
from invariants import assert_tail_padded
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import sharded_pagetable as sp

EASYDEL = "easydel==0.3.0"
# sha256 of easydel-0.3.0-py3-none-any.whl on PyPI; pip refuses any other file.
EASYDEL_SHA256 = "a91deae549b24a25d66c59dcd2f0d2b8a48e0d1e9b1e40fb111b624a9c3a8a6d"
MODULE_IN_WHEEL = "easydel/inference/esurge/page_table.py"
# What pip prints when it cannot reach the index (the only case this module skips for).
UNREACHABLE = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "ConnectionError",
    "ProxyError",
    "Read timed out",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
)

ROWS, MAX_LEN, TOKENS, PAGE_SIZES = 16, 64, 128, (8, 16)  # 8 and 4 pages per row
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)
MAX_ID = 999


# --------------------------------------------------------------------------- the real class


def _download_wheel(dest) -> str:
    req = dest / "requirements.txt"
    req.write_text(f"{EASYDEL} --hash=sha256:{EASYDEL_SHA256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--retries",
        "1",
        "--timeout",
        "15",
        "-d",
        str(dest),
        "-r",
        str(req),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip download {EASYDEL} timed out: the package index is unreachable")
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        if "from versions: none" in out and any(m in out for m in UNREACHABLE):
            pytest.skip(f"pip cannot reach the package index to fetch {EASYDEL}:\n{out[-800:]}")
        raise AssertionError(f"pip download {EASYDEL} failed (exit {proc.returncode}):\n{out}")
    wheels = sorted(dest.glob("easydel-0.3.0-*.whl"))
    assert wheels, f"pip download {EASYDEL} left no wheel in {dest}: {sorted(dest.iterdir())}"
    return str(wheels[0])


@pytest.fixture(scope="session")
def edl(tmp_path_factory) -> types.ModuleType:
    """EasyDeL 0.3.0's ``page_table`` module, loaded by path with a stub logger."""
    dest = tmp_path_factory.mktemp("easydel-wheel")
    with zipfile.ZipFile(_download_wheel(dest)) as wheel:
        path = dest / "page_table.py"
        path.write_bytes(wheel.read(MODULE_IN_WHEEL))
    loggings = types.ModuleType("eformer.loggings")
    loggings.get_logger = lambda name: __import__("logging").getLogger(name)
    eformer = types.ModuleType("eformer")
    eformer.loggings = loggings
    saved = {name: sys.modules.get(name) for name in ("eformer", "eformer.loggings")}
    sys.modules.update({"eformer": eformer, "eformer.loggings": loggings})
    try:
        spec = importlib.util.spec_from_file_location("easydel_0_3_0_page_table", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module


# --------------------------------------------------------------------------- shardings


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]), ("data",))


SHARDINGS = {
    "rows-over-data": lambda: NamedSharding(_mesh(), P("data", None)),
    "replicated": lambda: NamedSharding(_mesh(), P()),  # what eSurge's runner passes
    "single-device": lambda: SingleDeviceSharding(jax.devices()[1]),
    "none": lambda: None,
}


# --------------------------------------------------------------------------- constructor


@pytest.mark.parametrize("cls", ["PageTable", "MultiGroupPageTable"])
def test_signature_matches_easydel(edl, cls):
    """Every parameter of EasyDeL's constructor is ours too, at the same position, with the
    same kind and default; ours only adds keyword-only ones after them."""
    real = list(inspect.signature(getattr(edl, cls)).parameters.values())
    ours = list(inspect.signature(getattr(sp, cls)).parameters.values())
    for i, p in enumerate(real):
        assert ours[i].name == p.name, f"{cls} parameter {i}: {ours[i].name} != {p.name}"
        assert ours[i].kind == p.kind, f"{cls}.{p.name}: {ours[i].kind} != {p.kind}"
        assert ours[i].default == p.default, f"{cls}.{p.name} default {ours[i].default!r}"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(real) :])


def _multi_group_forms(cls, sharding):
    # SequenceBuffer's call (all keywords), all positional, and the mixed and bare forms.
    yield cls(
        max_num_reqs=ROWS,
        max_model_len=MAX_LEN,
        max_num_batched_tokens=TOKENS,
        page_sizes=list(PAGE_SIZES),
        sharding=sharding,
    )
    yield cls(ROWS, MAX_LEN, TOKENS, list(PAGE_SIZES), sharding)
    yield cls(ROWS, MAX_LEN, TOKENS, list(PAGE_SIZES), sharding=sharding)
    if sharding is None:
        yield cls(ROWS, MAX_LEN, TOKENS, list(PAGE_SIZES))


def _page_table_forms(cls, sharding):
    # MultiGroupPageTable's own call, all positional, all keywords.
    yield cls(ROWS, WIDTHS[0], TOKENS, sharding=sharding)
    yield cls(ROWS, WIDTHS[0], TOKENS, sharding)
    yield cls(
        max_num_reqs=ROWS,
        max_num_pages_per_req=WIDTHS[0],
        max_num_batched_tokens=TOKENS,
        sharding=sharding,
    )


def _assert_same_layout(ours, real, what: str) -> None:
    a, b = ours.get_device_tensor(), real.get_device_tensor()
    assert (a.shape, a.dtype) == (b.shape, b.dtype), f"{what}: {a.shape} {a.dtype} vs {b.shape}"
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (
        f"{what}: device table laid out as {a.sharding}, EasyDeL as {b.sharding}"
    )
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ours.cpu_version == real.cpu_version == 0, what
    for name in ("max_num_reqs", "max_num_pages_per_req", "max_num_batched_tokens"):
        assert getattr(ours, name) == getattr(real, name), f"{what}: {name}"
    np.testing.assert_array_equal(ours.page_table_cpu, real.page_table_cpu)
    np.testing.assert_array_equal(ours.num_pages_per_row, real.num_pages_per_row)


@pytest.mark.parametrize("sharding_name", list(SHARDINGS))
def test_constructor_call_forms_take_sharding(edl, sharding_name):
    sharding = SHARDINGS[sharding_name]()
    real_mg = next(_multi_group_forms(edl.MultiGroupPageTable, sharding))
    for i, ours in enumerate(_multi_group_forms(sp.MultiGroupPageTable, sharding)):
        assert len(ours.page_tables) == len(real_mg.page_tables)
        for g, real in enumerate(real_mg.page_tables):
            _assert_same_layout(ours[g], real, f"MultiGroupPageTable form {i} group {g}")
    real_pt = next(_page_table_forms(edl.PageTable, sharding))
    for i, ours in enumerate(_page_table_forms(sp.PageTable, sharding)):
        _assert_same_layout(ours, real_pt, f"PageTable form {i}")


def test_sharding_argument_must_be_a_sharding():
    with pytest.raises(TypeError, match=r"sharding must be a jax\.sharding\.Sharding.*got 4096"):
        sp.MultiGroupPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, 4096)
    with pytest.raises(TypeError, match="got 'cpu'"):
        sp.PageTable(ROWS, 8, TOKENS, "cpu")


def test_surface_used_by_esurge_exists(edl):
    """The methods of EasyDeL's classes, and the attributes eSurge reads, exist on ours."""
    real = edl.MultiGroupPageTable(ROWS, MAX_LEN, TOKENS, list(PAGE_SIZES))
    ours = sp.MultiGroupPageTable(ROWS, MAX_LEN, TOKENS, list(PAGE_SIZES))
    for table_r, table_o in ((real, ours), (real[0], ours[0])):
        methods = [n for n in dir(type(table_r)) if not n.startswith("_")]
        missing = [n for n in methods if not callable(getattr(table_o, n, None))]
        assert not missing, f"{type(table_o).__name__} lacks {missing}"
    for name in ("page_table_cpu", "num_pages_per_row", "cpu_version", "max_num_pages_per_req"):
        assert hasattr(ours[0], name), name
    assert len(ours.page_tables) == len(real.page_tables)


# --------------------------------------------------------------------------- differential


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(1, MAX_ID) for _ in range(n)]


def random_ops(seed: int, n: int, widths: tuple[int, ...], batch: bool = True):
    """Valid operations only (EasyDeL checks nothing), tracking counts to respect capacity."""
    rng = random.Random(seed)
    counts = [[0] * ROWS for _ in widths]
    names = ["append_row"] * 5 + ["add_row"] * 3 + ["move_row"] * 2 + ["swap_row"] * 2
    names += ["clear_row", "commit", "commit"] + ["append_rows_batch"] * (3 if batch else 0)
    for _ in range(n):
        op = rng.choice(names + (["clear"] if rng.random() < 0.02 else []))
        if op in ("append_row", "add_row"):
            row = rng.randrange(ROWS)
            room = [
                w - (0 if op == "add_row" else c[row]) for w, c in zip(widths, counts, strict=True)
            ]
            ids = [_ids(rng, rng.randint(0, min(r, 3) if rng.random() < 0.8 else r)) for r in room]
            for c, i in zip(counts, ids, strict=True):
                c[row] = (0 if op == "add_row" else c[row]) + len(i)
            yield op, (ids, row)
        elif op in ("move_row", "swap_row"):
            src = rng.randrange(ROWS)
            tgt = src if rng.random() < 0.15 else rng.randrange(ROWS)
            for c in counts:
                if op == "move_row":
                    c[tgt] = c[src]
                else:
                    c[src], c[tgt] = c[tgt], c[src]
            yield op, (src, tgt)
        elif op == "clear_row":
            row = rng.randrange(ROWS)
            for c in counts:
                c[row] = 0
            yield op, (row,)
        elif op == "append_rows_batch":
            rows = [rng.randrange(ROWS) for _ in range(rng.randint(1, 4))]  # repeats allowed
            per_req = []
            for row in rows:
                ids = [
                    _ids(rng, rng.randint(0, min(2, w - c[row])))
                    for w, c in zip(widths, counts, strict=True)
                ]
                for c, i in zip(counts, ids, strict=True):
                    c[row] += len(i)
                per_req.append(ids)
            yield op, (per_req, rows)
        elif op == "commit":
            yield op, (rng.choice([ROWS, rng.randint(0, ROWS)]),)
        else:  # clear
            counts = [[0] * ROWS for _ in widths]
            yield op, ()


def _call(table, single: bool, op: str, args: tuple) -> None:
    if single and op in ("append_row", "add_row"):
        args = (args[0][0], args[1])
    getattr(table, op)(*args)


def _assert_rows_match(ours: np.ndarray, real: np.ndarray, counts: np.ndarray, what: str):
    """Ours equals EasyDeL's on each row's valid prefix and is padded past it. (EasyDeL 0.3.0
    pads too, so this is full equality there; older releases left stale tails.)"""
    for r in range(ours.shape[0]):
        c = int(counts[r])
        assert ours[r, :c].tolist() == real[r, :c].tolist(), (
            f"{what} row {r}: ours {ours[r].tolist()} EasyDeL {real[r].tolist()}"
        )
    assert_tail_padded(ours, counts, what=what)


@pytest.mark.parametrize("sharding_name", ["rows-over-data", "replicated", "single-device"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["MultiGroupPageTable", "PageTable"])
def test_differential_against_easydel(edl, kind, seed, sharding_name):
    sharding = SHARDINGS[sharding_name]()
    single = kind == "PageTable"
    widths = WIDTHS[:1] if single else WIDTHS
    if single:
        real = edl.PageTable(ROWS, widths[0], TOKENS, sharding=sharding)
        ours = sp.PageTable(ROWS, widths[0], TOKENS, sharding=sharding)
        groups_r, groups_o = [real], [ours]
    else:
        real = edl.MultiGroupPageTable(ROWS, MAX_LEN, TOKENS, list(PAGE_SIZES), sharding)
        ours = sp.MultiGroupPageTable(ROWS, MAX_LEN, TOKENS, list(PAGE_SIZES), sharding)
        groups_r, groups_o = real.page_tables, [ours[g] for g in range(len(ours))]
    commits = 0
    for step, (op, args) in enumerate(random_ops(seed, 300, widths, batch=not single)):
        what = f"step {step} {op}{args}"
        v_real = [t.cpu_version for t in groups_r]
        v_ours = [t.cpu_version for t in groups_o]
        before = [(t.get_cpu_tensor().copy(), t.num_pages_per_row.copy()) for t in groups_o]
        _call(real, single, op, args)
        _call(ours, single, op, args)
        self_op = op in ("move_row", "swap_row") and args[0] == args[1]
        for g, (tr, to) in enumerate(zip(groups_r, groups_o, strict=True)):
            counts = np.asarray(tr.num_pages_per_row)
            np.testing.assert_array_equal(to.num_pages_per_row, counts, err_msg=what)
            _assert_rows_match(to.get_cpu_tensor(), tr.get_cpu_tensor(), counts, f"{what} g{g}")
            # cpu_version: ours moves exactly when the host table or a count changed
            # (what an engine caching on it relies on). EasyDeL's moves on every call that
            # writes, changed or not (a move or swap of a row with itself excepted), and may
            # count one call twice (add_row = clear_row + append_row): ours moves only when
            # EasyDeL's does, and never by more.
            d_real, d_ours = tr.cpu_version - v_real[g], to.cpu_version - v_ours[g]
            changed = not (
                np.array_equal(to.get_cpu_tensor(), before[g][0])
                and np.array_equal(to.num_pages_per_row, before[g][1])
            )
            assert (d_ours > 0) == changed, f"{what} g{g}: ours +{d_ours}, changed {changed}"
            assert d_ours <= d_real, f"{what} g{g}: ours +{d_ours}, EasyDeL +{d_real}"
            assert d_real > 0 or not changed, what
            assert not self_op or d_ours == 0, what
            if op == "commit":
                n = args[0]
                dev_r = np.asarray(tr.get_device_tensor())
                dev_o = np.asarray(to.get_device_tensor())
                _assert_rows_match(dev_o[:n], dev_r[:n], counts[:n], f"{what} g{g} device")
                assert to.get_device_tensor().sharding.is_equivalent_to(
                    tr.get_device_tensor().sharding, 2
                ), what
        commits += op == "commit"
    assert commits > 10


# --------------------------------------------------------------------------- cpu_version


def test_refused_calls_keep_cpu_version():
    t = sp.MultiGroupPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES)
    t.add_row([[1, 2], [3]], 2)
    t.commit(ROWS)
    bad = [
        lambda: t.append_row([[1], [2]], ROWS),
        lambda: t.append_row([[1], [2]], -1),
        lambda: t.append_row([[1], [2.5]], 3),
        lambda: t.append_row([[1], [-2]], 3),
        lambda: t.append_row([[1], [2], [3]], 3),
        lambda: t.append_row([[1] * (WIDTHS[0] - 1), [1] * WIDTHS[1]], 2),  # 2nd group full
        lambda: t.add_row([list(range(1, WIDTHS[0] + 2)), [1]], 3),
        lambda: t.move_row(1, ROWS),
        lambda: t.swap_row(-1, 0),
        lambda: t.clear_row(ROWS),
        lambda: t.append_rows_batch([[[1], [2]]], [1, 2]),
        lambda: t.append_rows_batch([[[1], [2]], [[1], [1] * WIDTHS[1]]], [2, 2]),
        lambda: t.commit(ROWS + 1),
        lambda: t[0].append_row([1] * (WIDTHS[0] - 1), 2),
        lambda: t[0].add_row([0.5], 2),
    ]
    versions = [t[g].cpu_version for g in range(2)]
    host = [t[g].get_cpu_tensor().copy() for g in range(2)]
    for i, call in enumerate(bad):
        with pytest.raises((ValueError, IndexError, TypeError)):
            call()
        assert [t[g].cpu_version for g in range(2)] == versions, f"refused call {i} bumped it"
        for g in range(2):
            np.testing.assert_array_equal(t[g].get_cpu_tensor(), host[g], err_msg=f"call {i}")


def test_cpu_version_counts_host_changes_only():
    t = sp.MultiGroupPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES)
    v = lambda: [t[g].cpu_version for g in range(2)]  # noqa: E731
    t.append_row([[1], []], 0)  # an empty list changes nothing in its group
    assert v() == [1, 0]
    t.commit(ROWS)
    t[0].get_device_tensor()
    assert v() == [1, 0]  # commits and reads never bump it
    t.move_row(0, 0)
    t.swap_row(3, 3)
    assert v() == [1, 0]
    t.add_row([[2], [3]], 1)
    t.move_row(1, 5)
    t.swap_row(1, 0)
    t.clear_row(5)
    assert v() == [5, 4]
    t.clear()
    assert v() == [6, 5]
    # Calls that leave every value as it was keep it: nothing to clear, a row rewritten
    # with the pages it holds, a move or swap between equal rows.
    t.clear()
    t.clear_row(7)
    t.add_row([[4], [5]], 2)
    t.add_row([[4], [5]], 2)
    t.move_row(2, 3)
    t.move_row(2, 3)
    t.swap_row(2, 3)
    t.append_rows_batch([[[], []]], [2])
    assert v() == [8, 7]


def test_sharded_group_view_exposes_cpu_version():
    with sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, num_shards=2) as t:
        assert [t[g].cpu_version for g in range(2)] == [0, 0]
        t.add_row([[1, 2], [3]], 1)
        t.move_row(1, 9)  # across shards
        t.commit(ROWS)
        assert [t[g].cpu_version for g in range(2)] == [2, 2]
        with pytest.raises(IndexError):
            t.swap_row(0, ROWS)
        assert [t[g].cpu_version for g in range(2)] == [2, 2]
