"""Paged attention over KV-local page pools vs JAX's reference kernel and dense attention."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel import (
    ref_ragged_paged_attention,
)
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_step_inputs import assert_collectives_within_shards

from sharded_pagetable.constants import cdiv
from sharded_pagetable.serving import attention as attention_module
from sharded_pagetable.serving.attention import (
    kv_sharding,
    paged_attention,
    write_kv,
    zeros_kv_cache,
)
from sharded_pagetable.shard.step_inputs import build_step_inputs
from sharded_pagetable.table.schedule import check_schedule

NUM_ROWS = 32
PAGE_SIZES = (4, 8)
MAX_LEN = 64
TOKENS = 64
KV_HEADS, Q_HEADS, DIM = 2, 4, 8
SCALE = DIM**-0.5
TOL = dict(rtol=1e-4, atol=1e-4)
# Few distinct (query, kv) lengths: the eager reference compiles its ops once per length.
CHUNKS = (3, 8, 12)
DONE = (0, 5, 16, 37)


class Case:
    """One mesh, ``S`` shards with their page pools, per-row ground-truth K/V."""

    def __init__(self, axes: dict[str, int], num_shards: int, seed: int) -> None:
        self.mesh = Mesh(np.array(jax.devices()).reshape(tuple(axes.values())), tuple(axes))
        self.num_shards = num_shards
        self.rows_per_shard = NUM_ROWS // num_shards
        self.budget = TOKENS // num_shards
        self.rng = np.random.default_rng(seed)
        shape = (NUM_ROWS, MAX_LEN, KV_HEADS, DIM)
        self.k_true = self.rng.standard_normal(shape, dtype=np.float32)  # f32[R, L, H, D]
        self.v_true = self.rng.standard_normal(shape, dtype=np.float32)
        self.pools, self.full_tables = [], []
        for size in PAGE_SIZES:  # each row gets distinct pages from its own shard's pool
            width = MAX_LEN // size
            pool = (self.rows_per_shard + 1) * width  # a few pages no row holds
            table = np.zeros((NUM_ROWS, width), dtype=np.int32)
            for s in range(num_shards):
                ids = s * pool + self.rng.permutation(pool)[: self.rows_per_shard * width]
                table[s * self.rows_per_shard : (s + 1) * self.rows_per_shard] = ids.reshape(
                    -1, width
                )
            at = np.argwhere(table == 0)  # row 0 starts at global page 0: padding's slot
            if at.size:
                table[tuple(at[0])] = table[0, 0]
            table[0, 0] = 0
            self.pools.append(pool)
            self.full_tables.append(table)

    def tables(self, need: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Tables holding just enough pages for ``need`` tokens per row (0 past each count)."""
        tables, counts = [], []
        for table, size in zip(self.full_tables, PAGE_SIZES, strict=True):
            count = np.array([cdiv(int(n), size) for n in need], dtype=np.int32)
            tables.append(np.where(np.arange(table.shape[1]) < count[:, None], table, 0))
            counts.append(count)
        return tables, counts

    def put(self, arr: np.ndarray) -> jax.Array:
        spec = P("data", *([None] * (arr.ndim - 1)))
        return jax.device_put(arr, NamedSharding(self.mesh, spec))

    def step(self, tables, counts, sched, done):
        s = check_schedule(
            counts, sched, done, len(sched), PAGE_SIZES, self.num_shards, self.budget
        )
        inputs = build_step_inputs(
            [self.put(t) for t in tables],
            self.put(s.sched),
            self.put(s.done),
            mesh=self.mesh,
            page_sizes=PAGE_SIZES,
            num_shards=self.num_shards,
            tokens_per_shard=self.budget,
        )
        return s, inputs

    def schedule(self, done: np.ndarray, num_reqs: int) -> np.ndarray:
        """Random prefill chunks, decodes and idle rows within each shard's budget."""
        sched = np.zeros(NUM_ROWS, dtype=np.int32)
        for row in range(num_reqs):
            room = MAX_LEN - int(done[row])
            if room > 0 and self.rng.random() < 0.8:
                chunk = min(room, self.rng.choice(CHUNKS))  # a prefill chunk
                sched[row] = 1 if done[row] and self.rng.random() < 0.6 else chunk
        for s in range(self.num_shards):  # over budget: the shard's last rows wait
            block = sched[s * self.rows_per_shard : (s + 1) * self.rows_per_shard]
            while block.sum() > self.budget:
                block[np.flatnonzero(block)[-1]] = 0
        return sched


def dense_attention(case: Case, queries: np.ndarray, token_rows, positions) -> np.ndarray:
    """Causal attention of each token over its own request's K/V, recomputed in numpy."""
    out = np.zeros_like(queries)
    group = Q_HEADS // KV_HEADS
    for t, (row, pos) in enumerate(zip(token_rows, positions, strict=True)):
        if row < 0:
            continue
        k = np.repeat(case.k_true[row, : pos + 1], group, axis=1)  # [pos+1, Hq, D]
        v = np.repeat(case.v_true[row, : pos + 1], group, axis=1)
        scores = np.einsum("hd,khd->hk", queries[t], k) * SCALE
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[t] = np.einsum("hk,khd->hd", p / p.sum(axis=1, keepdims=True), v)
    return out


def host_kv(case: Case, g: int, table: np.ndarray, kv_len: np.ndarray) -> np.ndarray:
    """Group ``g``'s cache with every row's first ``kv_len`` tokens written at its pages."""
    size = PAGE_SIZES[g]
    kv = np.zeros((case.num_shards * case.pools[g], size, 2 * KV_HEADS, DIM), np.float32)
    for row in range(NUM_ROWS):
        for pos in range(int(kv_len[row])):
            kv[table[row, pos // size], pos % size, 0::2] = case.k_true[row, pos]
            kv[table[row, pos // size], pos % size, 1::2] = case.v_true[row, pos]
    return kv


MESHES = [({"data": 8}, s) for s in (1, 2, 4, 8)] + [({"data": 4, "model": 2}, 2)]


@pytest.mark.parametrize(("axes", "num_shards"), MESHES)
def test_attention_matches_reference_kernel_and_dense(axes, num_shards) -> None:
    case = Case(axes, num_shards, seed=num_shards)
    num_reqs = NUM_ROWS - 5  # the last rows stay empty
    done = np.zeros(NUM_ROWS, dtype=np.int32)
    done[:num_reqs] = case.rng.choice(DONE, num_reqs)
    sched = case.schedule(done, num_reqs)
    tables, counts = case.tables(done + sched)
    s, inputs = case.step(tables, counts, sched[:num_reqs], done[:num_reqs])
    queries = case.rng.standard_normal((TOKENS, Q_HEADS, DIM), dtype=np.float32)
    token_rows, positions = np.asarray(inputs.token_rows), np.asarray(inputs.positions)
    dense = dense_attention(case, queries, token_rows, positions)
    kv_lens, cu_q_lens = np.asarray(inputs.kv_lens), np.asarray(inputs.cu_q_lens)
    rs, budget = case.rows_per_shard, case.budget
    for g in range(len(PAGE_SIZES)):
        kv = host_kv(case, g, tables[g], s.done + s.sched)
        got = paged_attention(
            case.put(queries),
            jax.device_put(kv, kv_sharding(case.mesh)),
            case.put(tables[g]),
            inputs,
            pages_per_shard=case.pools[g],
            num_shards=num_shards,
            sm_scale=SCALE,
        )
        assert got.sharding == NamedSharding(case.mesh, P("data", None, None))
        got = np.asarray(got)
        np.testing.assert_allclose(got, dense, **TOL)
        for shard in range(num_shards):  # (a) JAX's reference, eagerly, on local inputs
            pool = slice(shard * case.pools[g], (shard + 1) * case.pools[g])
            rows = slice(shard * rs, (shard + 1) * rs)
            local = tables[g][rows] - shard * case.pools[g]
            # numpy inputs: its per-sequence slicing and indexing stay in numpy, so the eager
            # jnp ops compile once per (query, kv) length instead of once per sequence.
            want = ref_ragged_paged_attention(
                queries[shard * budget : (shard + 1) * budget],
                kv[pool],
                kv_lens[rows],
                np.where(local >= 0, local, 0).astype(np.int32),
                cu_q_lens[shard],
                np.array([rs], dtype=np.int32),
                sm_scale=SCALE,
            )
            block = got[shard * budget : (shard + 1) * budget]
            n = int(cu_q_lens[shard, -1])
            np.testing.assert_allclose(block[:n], np.asarray(want), **TOL)
            assert not block[n:].any(), f"padding tokens of shard {shard} are not 0"


@pytest.mark.parametrize(("axes", "num_shards"), [({"data": 8}, 2), ({"data": 4, "model": 2}, 4)])
def test_write_kv_then_attention_over_steps(axes, num_shards) -> None:
    """Prefill chunks, then decodes: what write_kv stored reads back as dense attention.

    Padding tokens carry garbage and slot 0, which belongs to a live row of shard 0."""
    case = Case(axes, num_shards, seed=40 + num_shards)
    num_reqs = NUM_ROWS - 3
    tables, counts = case.tables(np.full(NUM_ROWS, MAX_LEN))
    for count in counts:
        count[num_reqs:] = 0
    for table in tables:
        table[num_reqs:] = 0
    kvs = [
        zeros_kv_cache(case.mesh, case.num_shards * pool, size, KV_HEADS, DIM)
        for pool, size in zip(case.pools, PAGE_SIZES, strict=True)
    ]
    device_tables = [case.put(t) for t in tables]
    done = np.zeros(NUM_ROWS, dtype=np.int32)
    for _ in range(5):
        sched = case.schedule(done, num_reqs)
        s, inputs = case.step(tables, counts, sched[:num_reqs], done[:num_reqs])
        token_rows, positions = np.asarray(inputs.token_rows), np.asarray(inputs.positions)
        pad = token_rows < 0
        k_new = case.k_true[token_rows, positions]  # f32[T, H, D]
        v_new = case.v_true[token_rows, positions]
        k_new[pad] = v_new[pad] = 1e3  # must not land anywhere
        queries = case.rng.standard_normal((TOKENS, Q_HEADS, DIM), dtype=np.float32)
        dense = dense_attention(case, queries, token_rows, positions)
        for g in range(len(PAGE_SIZES)):
            kvs[g] = write_kv(
                kvs[g],
                case.put(k_new),
                case.put(v_new),
                inputs.slot_mapping[g],
                inputs.token_rows,
                num_shards=num_shards,
            )
            got = paged_attention(
                case.put(queries),
                kvs[g],
                device_tables[g],
                inputs,
                pages_per_shard=case.pools[g],
                num_shards=num_shards,
                sm_scale=SCALE,
            )
            np.testing.assert_allclose(np.asarray(got), dense, **TOL)
        done = done + s.sched
    assert done.max() > 12, "the steps never went past the first prefill chunk"


def test_collectives_stay_inside_a_shard() -> None:
    case = Case({"data": 4, "model": 2}, 2, seed=1)
    pool, size = case.pools[0], PAGE_SIZES[0]
    kv = zeros_kv_cache(case.mesh, 2 * pool, size, KV_HEADS, DIM)
    tokens = case.put(np.zeros((TOKENS, KV_HEADS, DIM), np.float32))
    queries = case.put(np.zeros((TOKENS, Q_HEADS, DIM), np.float32))
    ids = case.put(np.zeros(TOKENS, np.int32))
    tables, counts = case.tables(np.zeros(NUM_ROWS, np.int32))
    _, inputs = case.step(tables, counts, [0] * NUM_ROWS, [0] * NUM_ROWS)
    write = attention_module._compiled_write(case.mesh, "data", 2, pool)
    attend = attention_module._compiled_attention(case.mesh, "data", 2, pool, SCALE)
    table = case.put(tables[0])
    for hlo in (
        write.lower(kv, tokens, tokens, ids, ids).compile().as_text(),
        attend.lower(queries, kv, table, inputs.kv_lens, inputs.cu_q_lens).compile().as_text(),
    ):
        assert_collectives_within_shards(hlo, devices_per_shard=2, replicas=2)


def test_write_kv_refuses_shapes() -> None:
    case = Case({"data": 8}, 2, seed=0)
    kv = zeros_kv_cache(case.mesh, 2 * case.pools[0], PAGE_SIZES[0], KV_HEADS, DIM)
    bad = case.put(np.zeros((TOKENS, KV_HEADS + 1, DIM), np.float32))
    ok = case.put(np.zeros((TOKENS, KV_HEADS, DIM), np.float32))
    slots = case.put(np.zeros(TOKENS, np.int32))
    with pytest.raises(ValueError, match="k_new has shape"):
        write_kv(kv, bad, ok, slots, slots, num_shards=2)
    with pytest.raises(ValueError, match="num_shards=3"):
        write_kv(kv, ok, ok, slots, slots, num_shards=3)
