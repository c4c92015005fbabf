"""KV copies over a channel (``serving/kv_transfer``): each simulated shard process works on
its own copy of the cache, in its own thread, and talks to the others only through peers;
every pool must end as a numpy replay of the plan made it, and a source that cannot be
reached leaves exactly its pages torn and unwritten."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharded_pagetable.serving.kv_transfer import move_kv_pages, split_round

SHARDS, POOL, PAGE = 4, 8, (2, 4, 3)


class Peers:
    """In-memory peers: posts go in a shared outbox, fetches wait for them."""

    def __init__(self, unreachable: set[int] = frozenset()) -> None:
        self.outbox: dict = {}
        self.cond = threading.Condition()
        self.unreachable = unreachable
        self.torn: dict[int, list] = {}

    def of(self, shard: int):
        peers = self

        class Peer:
            def __init__(self) -> None:
                self.shard = shard

            def post(self, key, frames):
                with peers.cond:
                    for t, f in frames.items():
                        peers.outbox[(shard, t, key)] = f
                    peers.cond.notify_all()

            def fetch(self, source, key, max_bytes):
                if source in peers.unreachable:
                    raise ConnectionRefusedError(f"shard {source} is gone")
                with peers.cond:
                    assert peers.cond.wait_for(lambda: (source, shard, key) in peers.outbox, 10)
                    frame = peers.outbox[(source, shard, key)]
                assert len(frame) <= max_bytes
                return frame

            def tear(self, pages):
                peers.torn[shard] = pages

        return Peer()


def cache(rng: np.random.Generator) -> tuple[np.ndarray, jax.Array]:
    mesh = Mesh(np.array(jax.devices()[:SHARDS]), ("data",))
    host = rng.standard_normal((SHARDS * POOL, *PAGE)).astype(np.float32)
    return host, jax.device_put(host, NamedSharding(mesh, P("data", None, None, None)))


def plan(rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` copies between distinct pages, no page both a source and a destination."""
    pages = rng.permutation(SHARDS * POOL)[: 2 * k]
    return np.stack([pages[:k], pages[k:]]).astype(np.int32)


def run(rounds, unreachable=frozenset(), seed=0):
    """Every shard's cache after its thread ran ``move_kv_pages``, and the torn pages."""
    rng = np.random.default_rng(seed)
    host, _ = cache(rng)
    peers = Peers(set(unreachable))
    out: dict[int, tuple] = {}

    def shard_main(s: int) -> None:
        _, kv = cache(np.random.default_rng(seed))
        out[s] = move_kv_pages([kv], [rounds], [POOL], 7, peers.of(s))

    threads = [threading.Thread(target=shard_main, args=(s,)) for s in range(SHARDS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return host, out, peers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_pool_ends_as_a_replay_of_the_plan(seed):
    rng = np.random.default_rng(100 + seed)
    rounds = [plan(rng, 9), plan(rng, 5)]
    host, out, peers = run(rounds, seed=seed)
    want = host.copy()
    for r in rounds:
        want[r[1]] = want[r[0]]  # each round reads before it writes
    for s in range(SHARDS):
        (kv,), torn = out[s]
        pool = slice(s * POOL, (s + 1) * POOL)
        np.testing.assert_array_equal(np.asarray(kv)[pool], want[pool])
        assert all(t.size == 0 for t in torn)
    assert not peers.torn


def test_an_unreachable_source_leaves_exactly_its_pages_torn():
    rng = np.random.default_rng(5)
    rounds = [plan(rng, 12)]
    dead = 1
    host, out, peers = run(rounds, unreachable={dead})
    src, dst = rounds[0].astype(np.int64)
    for s in range(SHARDS):
        if s == dead:
            continue
        (kv,), (torn,) = out[s]
        mine = dst // POOL == s
        from_dead = mine & (src // POOL == dead)
        np.testing.assert_array_equal(torn, np.sort(dst[from_dead]))
        got = np.asarray(kv)
        for a, b in zip(src[mine & ~from_dead], dst[mine & ~from_dead], strict=True):
            np.testing.assert_array_equal(got[b], host[a])
        for b in dst[from_dead]:
            np.testing.assert_array_equal(got[b], host[b])  # not written, not in part
        if from_dead.any():
            np.testing.assert_array_equal(peers.torn[s][0], torn)


def test_split_round_names_each_copy_once_from_both_ends():
    rng = np.random.default_rng(3)
    p = plan(rng, 14)
    sent, received = set(), set()
    for s in range(SHARDS):
        split = split_round([p], [SHARDS * POOL], [POOL], s)
        for t, [(src, dst)] in split.send.items():
            assert (src // POOL == s).all() and (dst // POOL == t).all()
            sent |= set(zip(src.tolist(), dst.tolist(), strict=True))
        for source, [dst] in split.recv.items():
            assert (dst // POOL == s).all()
            received |= {(source, d) for d in dst.tolist()}
    assert sent == set(zip(p[0].tolist(), p[1].tolist(), strict=True))
    assert received == {(a // POOL, b) for a, b in zip(p[0].tolist(), p[1].tolist(), strict=True)}


def test_a_bad_plan_is_refused_before_any_page_moves():
    rng = np.random.default_rng(0)
    _, kv = cache(rng)
    before = np.asarray(kv).copy()
    bad = np.array([[1, 2], [3, 3]], np.int32)  # a destination named twice
    with pytest.raises(ValueError, match="destination page 3"):
        move_kv_pages([kv], [[bad]], [POOL], 1, Peers().of(0))
    np.testing.assert_array_equal(np.asarray(kv), before)
