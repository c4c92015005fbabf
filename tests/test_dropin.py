"""ShardedPageTable as a drop-in for MultiGroupPageTable (issue 20): built the way engines
build theirs (``sharding=`` and the seed's arguments only, the rest from a default config),
any row count, several in-process shards per device, nothing started until used, and
``cpu_version`` as an engine relies on it. The Ray side is in ``test_dropin_ray.py``."""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from differential import random_ops, run_differential
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import sharded_pagetable as sp
from sharded_pagetable import defaults
from sharded_pagetable.serving.runner import AttentionConfig, drop_cache, max_error, serve_step

REPO = Path(__file__).resolve().parents[1]
ROWS, MAX_LEN, TOKENS, PAGE_SIZES = 16, 256, 64, (16, 64)
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)


@pytest.fixture(autouse=True)
def _no_default(monkeypatch):
    """Every test starts from the built-in default, and leaves it so."""
    monkeypatch.delenv(defaults.ENV_VAR, raising=False)
    sp.configure()
    yield
    sp.configure()


def mesh_of(n: int, *axes: str) -> Mesh:
    devices = np.array(jax.devices()[:n])
    return Mesh(devices.reshape((n,) if len(axes) < 2 else (n // 2, 2)), axes or ("data",))


def snapshot(table, group):
    return table.device_snapshot(group)


# --------------------------------------------------------------------------- construction


def test_signature_takes_every_argument_of_multigroup_page_table():
    """MultiGroupPageTable's parameters, in order and of the same kind, begin ours (the
    first five with the same defaults); ours add keyword-only ones after them."""
    theirs = list(inspect.signature(sp.MultiGroupPageTable).parameters.values())
    ours = inspect.signature(sp.ShardedPageTable).parameters
    for p in theirs:
        assert p.name in ours and ours[p.name].kind == p.kind, p.name
    names = list(ours)
    positional = [p.name for p in theirs if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert (
        names[: len(positional)]
        == positional
        == [
            "max_num_reqs",
            "max_model_len",
            "max_num_batched_tokens",
            "page_sizes",
            "sharding",
        ]
    )
    assert ours["sharding"].default is None
    public = [p for p in ours.values() if not p.name.startswith("_")]
    assert all(p.kind is p.KEYWORD_ONLY for p in public[len(positional) :])


def test_engine_shaped_construction_with_sharding_and_the_seeds_arguments_only():
    """What EasyDeL's eSurge does (SequenceBuffer: keywords, a replicated NamedSharding),
    through a partial as an engine's factory would: one in-process shard by default, and
    the same tables as MultiGroupPageTable built with the same call."""
    sharding = NamedSharding(mesh_of(8, "dp"), P())
    call = dict(
        max_num_reqs=ROWS,
        max_model_len=MAX_LEN,
        max_num_batched_tokens=TOKENS,
        page_sizes=list(PAGE_SIZES),
        sharding=sharding,
    )
    factory = functools.partial(sp.ShardedPageTable)
    for table in (factory(**call), sp.ShardedPageTable(*call.values())):
        assert (table.num_shards, table.backend_name, table.started) == (1, "local", False)
        assert table.mesh_axes == {"data": 8}  # the sharding's devices, rows split over them
        reference = sp.MultiGroupPageTable(**call, warmup=False)
        commits = run_differential(table, reference, random_ops(3, ROWS, WIDTHS, 200), snapshot)
        assert commits > 10 and table.started
        arr = table[0].get_device_tensor()
        assert arr.sharding.spec == P("data", None) and set(arr.devices()) == set(jax.devices())
        table.close()


def test_sharding_names_the_devices_of_an_in_process_table():
    one = sp.ShardedPageTable(
        ROWS, MAX_LEN, TOKENS, PAGE_SIZES, SingleDeviceSharding(jax.devices()[3])
    )
    two_d = NamedSharding(mesh_of(8, "data", "model"), P("data", None))
    grid = sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, two_d, num_shards=2)
    other = NamedSharding(mesh_of(4, "dp", "tp"), P())  # no "data" axis: its devices, 1-D
    flat = sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, other, num_shards=4)
    assert (one.mesh_axes, grid.mesh_axes, flat.mesh_axes) == (
        {"data": 1},
        {"data": 4, "model": 2},
        {"data": 4},
    )
    for t in (one, grid, flat):
        t.add_row([[1, 2], [3]], ROWS - 1)
        t.commit(ROWS)
    assert one[0].get_device_tensor().devices() == {jax.devices()[3]}
    assert flat[0].get_device_tensor().devices() == set(jax.devices()[:4])
    assert len(grid[0].get_device_tensor().addressable_shards) == 8
    with pytest.raises(TypeError, match=r"sharding must be a jax\.sharding\.Sharding.*got 'cpu'"):
        sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, "cpu")


# --------------------------------------------------------------------------- default config


def test_default_config_from_configure_then_env_then_built_in(tmp_path, monkeypatch):
    def build(**kw):
        return sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, **kw)

    assert build().num_shards == 1 and sp.default_config() == sp.TableDefaults()
    path = tmp_path / "engine.yaml"
    path.write_text("num_shards: 2\nmesh: {data: 4, model: 2}\nrecover: auto\n")
    monkeypatch.setenv(defaults.ENV_VAR, str(path))
    t = build()
    assert (t.num_shards, t.mesh_axes, t.recover_mode) == (2, {"data": 4, "model": 2}, "auto")
    assert build(num_shards=4).num_shards == 4  # a keyword given always wins
    path.write_text("num_shards: 8\n")  # the file is read again when it changes
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert build().num_shards == 8
    assert sp.configure(num_shards=4, warmup=False).num_shards == 4  # over the env var
    assert build().num_shards == 4 and build().mesh_axes == {"data": 8}
    with pytest.raises(sp.ConfigError, match="num_shards"):
        sp.configure(num_shards=0)
    assert build().num_shards == 4  # a refused configure changes nothing
    assert sp.configure() is None  # forgotten: the env var applies again
    assert build().num_shards == 8 and sp.default_config().num_shards == 8
    monkeypatch.delenv(defaults.ENV_VAR)
    assert build().num_shards == 1


def test_the_shipped_engine_default_builds_ray_tables_lazily(monkeypatch):
    monkeypatch.setenv(defaults.ENV_VAR, str(REPO / "configs" / "engine-ray.yaml"))
    t = sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, NamedSharding(mesh_of(8), P()))
    assert (t.num_shards, t.backend_name, t.recover_mode, t.started) == (4, "ray", "auto", False)
    assert t.mesh_axes == {"data": 4}  # a shard process per device of its own, not `sharding`
    t.close()


def test_default_config_refuses_a_shape_and_bad_files(tmp_path, monkeypatch):
    path = tmp_path / "table.yaml"
    path.write_text("max_num_reqs: 64\nnum_shards: 2\n")
    with pytest.raises(sp.ConfigError, match="max_num_reqs is not a default"):
        sp.configure(str(path))
    monkeypatch.setenv(defaults.ENV_VAR, str(path))
    with pytest.raises(sp.ConfigError, match="max_num_reqs is not a default"):
        sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES)
    monkeypatch.setenv(defaults.ENV_VAR, str(tmp_path / "missing.yaml"))
    with pytest.raises(sp.ConfigError, match=r"SHARDED_PAGETABLE_CONFIG=.*missing\.yaml"):
        sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES)
    with pytest.raises(sp.ConfigError, match="num_shards=3 must divide"):
        sp.configure(num_shards=3, mesh={"data": 8})
    with pytest.raises(sp.ConfigError, match="unknown config key bogus"):
        sp.configure(bogus=1)


# --------------------------------------------------------------------------- row counts


@pytest.mark.parametrize(
    ("rows", "devices", "shards"), [(3, 2, 2), (3, 2, 1), (5, 8, 4), (13, 4, 8)]
)
def test_rows_that_do_not_divide_work_as_in_multigroup_page_table(rows, devices, shards):
    """The capacity rounds up to split over the row axis and the shards; rows at or past
    max_num_reqs are refused with MultiGroupPageTable's exceptions and messages, and the
    host table keeps its shape."""
    sharding = NamedSharding(mesh_of(devices), P("data", None))
    t = sp.ShardedPageTable(rows, MAX_LEN, TOKENS, PAGE_SIZES, sharding, num_shards=shards)
    ref = sp.MultiGroupPageTable(rows, MAX_LEN, TOKENS, PAGE_SIZES, warmup=False)
    capacity = t.layout.max_num_reqs
    assert capacity >= rows and capacity % devices == capacity % shards == 0
    assert capacity - rows < max(devices, shards)
    assert run_differential(t, ref, random_ops(rows, rows, WIDTHS, 150), snapshot) > 5
    calls = [
        lambda x: x.append_row([[1], [2]], rows),
        lambda x: x.add_row([[1], [2]], capacity - 1),
        lambda x: x.move_row(0, rows),
        lambda x: x.swap_row(rows + 1, 0),
        lambda x: x.clear_row(rows),
        lambda x: x.append_rows_batch([[[1], [2]]], [rows]),
        lambda x: x.commit(rows + 1),
        lambda x: x.compute_slot_mapping(0, [rows], [0]),
    ]
    for i, call in enumerate(calls):
        errors = []
        for table in (t, ref):
            with pytest.raises((ValueError, IndexError)) as info:
                call(table)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1], f"call {i}"
    for g in range(len(PAGE_SIZES)):
        assert t[g].get_cpu_tensor().shape == ref[g].get_cpu_tensor().shape == (rows, WIDTHS[g])
        assert t[g].num_pages_per_row.shape == (rows,) and t[g].max_num_reqs == rows
        assert t.device_snapshot(g).shape == (rows, WIDTHS[g])
        dev = np.asarray(t[g].get_device_tensor())  # the capacity: rows past max_num_reqs pad
        assert dev.shape == (capacity, WIDTHS[g]) and not dev[rows:].any()
    t.close()


# --------------------------------------------------------------------------- shared devices


def serving_steps(t: sp.ShardedPageTable, cfg: AttentionConfig) -> list:
    """Two steps of a model on every shard: prefill chunks on every shard, then decodes and
    a row that moves to another shard with its KV. Returns, per step, the epoch (or the KV
    copies), the step snapshot and the model step's (tokens, max error vs dense attention),
    then the device tables."""
    rps, pool = t.layout.rows_per_shard, cfg.pages_per_shard
    rows = [0, 1, rps, 2 * rps + 3, 3 * rps + rps - 1]
    uids = np.full(t.layout.max_num_reqs, -1, np.int32)
    for i, row in enumerate(rows):
        base = (row // rps) * pool + 8 * i
        t.add_row([[base, base + 1, base + 2], [base + 3]], row)
        uids[row] = 100 + i
    n = max(rows) + 1
    sched, done = np.zeros(n, np.int32), np.zeros(n, np.int32)
    sched[rows] = [9, 17, 3, 30, 1]
    out = [t.commit(n, num_scheduled_tokens=sched, num_computed_tokens=done).epoch]
    outputs = t.run_on_shards(serve_step, cfg, uids, step=True)
    out += [t.step_snapshot(), max_error(cfg, outputs, uids)]
    new = 3 * pool + 50  # free pages of shard 3's pool
    t.move_row(rps, 3 * rps + 1, page_ids=[[new, new + 1, new + 2], [new + 3]])
    t.clear_row(rps)
    uids[[rps, 3 * rps + 1]] = [-1, uids[rps]]
    n = 3 * rps + rps
    sched, done = np.zeros(n, np.int32), np.zeros(n, np.int32)
    for row, held in ((0, 9), (1, 17), (3 * rps + 1, 3), (2 * rps + 3, 30), (n - 1, 1)):
        sched[row], done[row] = 1, held
    receipt = t.commit(n, num_scheduled_tokens=sched, num_computed_tokens=done)
    outputs = t.run_on_shards(serve_step, cfg, uids, step=True)
    out += [receipt.kv_copies, t.step_snapshot(), max_error(cfg, outputs, uids)]
    return out + [t.device_snapshot(g) for g in range(len(PAGE_SIZES))]


def step_fields(arrays, step):
    x = step.inputs
    return [np.asarray(a) for a in (x.token_rows, x.positions, *x.slot_mapping, x.kv_lens)] + [
        np.asarray(x.cu_q_lens)
    ]


@pytest.mark.parametrize("devices", [1, 2])
def test_four_shards_on_fewer_devices_match_a_device_per_shard(devices):
    """In-process shards sharing devices (each still owning its block of rows): device
    tables, step inputs (snapshots and the global arrays a model step gets) and a model
    step's attention equal those of the same table with two devices per shard."""
    outs = {}
    for name, sharding in (("shared", NamedSharding(mesh_of(devices), P())), ("own", None)):
        cfg = AttentionConfig(f"{name}-{devices}", PAGE_SIZES, 4, 64)
        t = sp.ShardedPageTable(
            64, 512, 256, PAGE_SIZES, sharding, num_shards=4, pages_per_shard=64
        )
        assert t.layout.shards_per_block == (4 // devices if name == "shared" else 1)
        got = serving_steps(t, cfg)
        errors = [got[2], got[5]]  # (tokens checked, max error vs dense attention) per step
        assert errors[0][0] == 60 and errors[1][0] == 5, errors
        assert all(err < 1e-5 for _, err in errors), errors
        got += [t.run_on_shards(step_fields, step=True)[0]]
        t.run_on_shards(lambda arrays, name: drop_cache(name), cfg.name)
        outs[name] = [got[0], got[1], got[3], got[4], *got[6:]]
        t.close()
    flat = [jax.tree.leaves(outs[k]) for k in ("shared", "own")]
    assert len(flat[0]) == len(flat[1])
    for i, (a, b) in enumerate(zip(*flat, strict=True)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"leaf {i}")


def test_a_ray_shard_still_needs_devices_of_its_own():
    with pytest.raises(
        ValueError, match=r"num_shards=4 must divide .*every shard needs devices of its own"
    ):
        sp.ShardedPageTable(
            ROWS, MAX_LEN, TOKENS, PAGE_SIZES, num_shards=4, backend="ray", mesh={"data": 2}
        )


# --------------------------------------------------------------------------- construction cost


def test_a_table_used_on_the_host_only_starts_nothing():
    """Sixteen tables built and used the way eSurge uses most of its tables (row ops, host
    reads, clear, never a commit) hold no device buffer and start no shard; the first
    commit starts the shards."""
    before = len(jax.live_arrays())
    tables = [
        sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, list(PAGE_SIZES), num_shards=4)
        for _ in range(16)
    ]
    for t in tables:
        t.add_row([[1, 2], [3]], 5)
        t.move_row(5, 9)
        t[0].get_cpu_tensor()
        t.clear()
        t.swap_row(1, 2)
        assert t.wait() is None
    assert not any(t.started for t in tables)
    assert len(jax.live_arrays()) <= before
    tables[0].append_row([[7], [8]], 3)
    tables[0].commit(ROWS)
    assert tables[0].started and tables[0].device_snapshot(0)[3, 0] == 7
    for t in tables:
        t.close()
    with pytest.raises(RuntimeError, match="closed"):
        tables[1].commit(ROWS)


def test_ray_tables_built_and_dropped_unused_import_and_start_nothing():
    """A never-committed Ray table costs its host mirror: 16 of them are built in well under
    a second, without importing Ray (in a fresh process, so nothing imported it before)."""
    code = (
        "import sys, time\n"
        "import sharded_pagetable as sp\n"
        "sp.ShardedPageTable(8, 64, 16, [16])  # warm the imports\n"
        "t0 = time.perf_counter()\n"
        "ts = [sp.ShardedPageTable(256, 8192, 2048, [16, 64], num_shards=4, backend='ray',\n"
        "      ray={'devices_per_shard': 1}) for _ in range(16)]\n"
        "for t in ts:\n"
        "    t.add_row([[1], [2]], 3); t[0].get_cpu_tensor(); t.clear()\n"
        "elapsed = time.perf_counter() - t0\n"
        "del ts\n"
        "print(elapsed, 'ray' in sys.modules)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop(defaults.ENV_VAR, None)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr
    elapsed, imported = res.stdout.split()
    assert imported == "False", "building a Ray table imported Ray"
    assert float(elapsed) < 1.0, f"16 never-committed Ray tables took {elapsed} s"


# --------------------------------------------------------------------------- cpu_version


def test_cpu_version_moves_exactly_when_the_host_table_changes():
    """What an engine caching on ``cpu_version`` relies on, on the sharded table (whose
    mirror is what ``get_cpu_tensor`` returns) and the single-process one alike: it moves
    whenever the host table or a count changed and only then, never for commits, reads or
    refused calls."""
    for make in (
        lambda: sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, num_shards=4),
        lambda: sp.MultiGroupPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, warmup=False),
    ):
        t = make()
        cache = {}  # group -> (version, view derived from the host table), as eSurge keeps
        for step, (name, args) in enumerate(random_ops(11, ROWS, WIDTHS, 400)):
            before = [(t[g].cpu_version, t[g].get_cpu_tensor().copy()) for g in range(2)]
            counts = [t[g].num_pages_per_row.copy() for g in range(2)]
            try:
                getattr(t, name)(*args)
                refused = False
            except (ValueError, IndexError):
                refused = True
            for g in range(2):
                changed = not (
                    np.array_equal(t[g].get_cpu_tensor(), before[g][1])
                    and np.array_equal(t[g].num_pages_per_row, counts[g])
                )
                moved = t[g].cpu_version != before[g][0]
                where = f"{type(t).__name__} step {step} {name}{args} g{g}"
                assert moved == changed, where
                assert not (refused and moved), where
                if name in ("commit",) or refused:
                    assert not moved, where
                version = t[g].cpu_version
                if cache.get(g, (None,))[0] == version:  # a cache hit must be right
                    np.testing.assert_array_equal(cache[g][1], t[g].get_cpu_tensor(), where)
                cache[g] = (version, t[g].get_cpu_tensor().copy())
        if isinstance(t, sp.ShardedPageTable):
            t.close()
