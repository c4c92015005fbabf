"""Several scheduler threads sharing one ShardedPageTable (local backend, 4 shards)."""

from __future__ import annotations

import itertools
import sys
import threading

import numpy as np
import pytest

import sharded_pagetable as sp

ROWS, MAX_LEN, TOKENS, PAGE_SIZES, SHARDS = 64, 512, 256, (16, 64), 4
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)
THREADS = 4
OPS_PER_THREAD = 300


@pytest.fixture(autouse=True)
def _frequent_thread_switches():
    """Switch threads every 10 us instead of every 5 ms, so the threads really interleave."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def make_table() -> sp.ShardedPageTable:
    return sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, num_shards=SHARDS)


def thread_ops(k: int, seed: int) -> list[tuple[str, tuple]]:
    """Valid ops of thread ``k`` on its own rows (``r % THREADS == k``, spread over every
    shard), with commits now and then. Counts are tracked so no append overflows."""
    rng = np.random.default_rng([seed, k])
    rows = list(range(k, ROWS, THREADS))
    counts = {r: [0] * len(WIDTHS) for r in rows}
    next_id = 1 + k * 1_000_000  # ids unique per thread (and never 0, the padding value)

    def ids(g: int, n: int) -> list[int]:
        nonlocal next_id
        out = list(range(next_id, next_id + n))
        next_id += n
        return out

    ops = []
    for _ in range(OPS_PER_THREAD):
        kind = rng.choice(
            ["append", "add", "clear", "move", "swap", "batch", "commit"],
            p=[0.3, 0.12, 0.08, 0.14, 0.14, 0.1, 0.12],
        )
        r = int(rng.choice(rows))
        if kind == "append":
            new = [
                ids(g, int(rng.integers(0, min(3, w - counts[r][g]) + 1)))
                for g, w in enumerate(WIDTHS)
            ]
            ops.append(("append_row", (new, r)))
            counts[r] = [c + len(n) for c, n in zip(counts[r], new, strict=True)]
        elif kind == "add":
            new = [ids(g, int(rng.integers(0, min(6, w) + 1))) for g, w in enumerate(WIDTHS)]
            ops.append(("add_row", (new, r)))
            counts[r] = [len(n) for n in new]
        elif kind == "clear":
            ops.append(("clear_row", (r,)))
            counts[r] = [0] * len(WIDTHS)
        elif kind in ("move", "swap"):
            t = int(rng.choice(rows))
            if kind == "move":
                ops.append(("move_row", (r, t)))
                counts[t] = list(counts[r])
            else:
                ops.append(("swap_row", (r, t)))
                counts[r], counts[t] = counts[t], counts[r]
        elif kind == "batch":
            picked = [int(x) for x in rng.choice(rows, size=int(rng.integers(1, 4)))]
            per_req = []
            for row in picked:
                new = [
                    ids(g, int(rng.integers(0, min(2, w - counts[row][g]) + 1)))
                    for g, w in enumerate(WIDTHS)
                ]
                counts[row] = [c + len(n) for c, n in zip(counts[row], new, strict=True)]
                per_req.append(new)
            ops.append(("append_rows_batch", (per_req, picked)))
        else:
            ops.append(("commit", (ROWS,)))
    return ops


def run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def wrap(fn):
        def body():
            try:
                start.wait()
                fn()
            except BaseException as exc:  # collected and re-raised by the test
                errors.append(exc)

        return body

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a worker thread hung"
    return errors


def assert_tail_padded(table_2d: np.ndarray, counts: np.ndarray, what: str) -> None:
    past = np.arange(table_2d.shape[1])[None, :] >= counts[:, None]
    bad = np.argwhere(past & (table_2d != sp.PAGE_TABLE_PADDING_VAL))
    assert bad.size == 0, f"{what}: stale page ids past the count at (row, col) {bad[:5].tolist()}"


@pytest.mark.parametrize("seed", [0, 1])
def test_threads_on_disjoint_rows_match_sequential_replay(seed):
    plans = [thread_ops(k, seed) for k in range(THREADS)]
    receipts: list[list] = [[] for _ in range(THREADS)]
    order: list[int] = []  # which thread finished each op, in completion order
    with make_table() as t:

        def worker(k: int):
            def run():
                for name, args in plans[k]:
                    result = getattr(t, name)(*args)
                    if name == "commit":
                        receipts[k].append(result)
                    order.append(k)

            return run

        errors = run_threads([worker(k) for k in range(THREADS)])
        assert not errors, errors
        switches = sum(a != b for a, b in itertools.pairwise(order))
        assert switches >= 2 * THREADS, f"threads barely interleaved ({switches} switches)"
        final = t.commit(ROWS)

        ref = sp.MultiGroupPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES)
        for plan in plans:  # ops of different threads touch disjoint rows: they commute
            for name, args in plan:
                if name != "commit":
                    getattr(ref, name)(*args)
        ref.commit(ROWS)

        for g in range(len(PAGE_SIZES)):
            np.testing.assert_array_equal(t[g].num_pages_per_row, ref[g].num_pages_per_row)
            np.testing.assert_array_equal(t[g].get_cpu_tensor(), ref[g].get_cpu_tensor())
            snap = t.device_snapshot(g)
            np.testing.assert_array_equal(snap, t[g].get_cpu_tensor())
            np.testing.assert_array_equal(snap, np.asarray(ref[g].get_device_tensor()))
            assert_tail_padded(snap, t[g].num_pages_per_row, f"device group {g}")

        # Epochs: each commit that changed something is a new epoch, unique over threads and
        # increasing in every thread; a commit with nothing to send reports the current one.
        changed = []
        for k, mine in enumerate(receipts):
            assert len(mine) == sum(name == "commit" for name, _ in plans[k])
            epochs = [r.epoch for r in mine]
            assert epochs == sorted(epochs), f"thread {k}: epochs go back: {epochs}"
            fresh = [r.epoch for r in mine if r.changed]
            assert all(a < b for a, b in itertools.pairwise(fresh)), (k, fresh)
            changed += fresh
        assert len(changed) == len(set(changed)), "two commits published the same epoch"
        if final.changed:
            changed.append(final.epoch)
        assert sorted(changed) == list(range(1, t.epoch + 1))
        assert len(changed) > THREADS  # the threads really committed concurrently


def test_concurrent_commits_and_row_ops_keep_rows_padded():
    """Threads on shared rows, with bad calls, random-size commits and readers; at a few
    barriers (everyone paused) and at the end, every row is padded past its count on the
    host and, after commit(ROWS), on the device."""
    rounds, ops_per_round = 4, 120
    writers = THREADS
    pause = threading.Barrier(writers + 1)
    resume = threading.Barrier(writers + 1)
    unexpected: list[BaseException] = []
    expected_errors = [0] * writers
    commits = [0] * writers

    with make_table() as t:

        def check_paused_state(label: str) -> None:
            for g in range(len(PAGE_SIZES)):
                host, counts = t[g].get_cpu_tensor(), t[g].num_pages_per_row
                assert np.all((counts >= 0) & (counts <= WIDTHS[g])), label
                assert_tail_padded(host, counts, f"{label}: host group {g}")
            t.commit(ROWS)
            for g in range(len(PAGE_SIZES)):
                snap = t.device_snapshot(g)
                np.testing.assert_array_equal(snap, t[g].get_cpu_tensor(), label)
                assert_tail_padded(snap, t[g].num_pages_per_row, f"{label}: device group {g}")

        def writer(k: int):
            def run():
                rng = np.random.default_rng(100 + k)
                for _ in range(rounds):
                    for _ in range(ops_per_round):
                        r, s = (int(x) for x in rng.integers(0, ROWS, 2))
                        kind = int(rng.integers(0, 11))
                        try:
                            if kind == 0:
                                t.append_row([[int(rng.integers(1, 999))] * 3, [7]], r)
                            elif kind == 1:
                                n = int(rng.integers(0, WIDTHS[1] + 2))  # may overflow
                                t.add_row([list(range(1, n + 1)), list(range(1, n + 1))], r)
                            elif kind == 2:
                                t.clear_row(r)
                            elif kind == 3:
                                t.move_row(r, s)
                            elif kind == 4:
                                t.swap_row(r, s)
                            elif kind == 5:
                                t.append_rows_batch([[[5], [6]], [[7, 8], []]], [r, s])
                            elif kind == 6:
                                t.commit(int(rng.integers(0, ROWS + 1)))
                                commits[k] += 1
                            elif kind == 7:
                                t.compute_slot_mapping(0, [r], [0])  # row may be empty
                            elif kind == 8:
                                t.device_snapshot(int(rng.integers(0, 2)))
                            elif kind == 9:
                                t.append_row([[1.5], [1]], r)  # always refused
                            else:
                                t.move_row(r, ROWS + s)  # always refused
                        except (ValueError, IndexError):
                            expected_errors[k] += 1
                        except BaseException as exc:
                            unexpected.append(exc)
                    pause.wait(timeout=60)
                    resume.wait(timeout=60)

            return run

        def checker():
            for i in range(rounds):
                pause.wait(timeout=60)
                try:
                    check_paused_state(f"round {i}")
                except BaseException:
                    pause.abort()  # release the writers instead of letting them time out
                    resume.abort()
                    raise
                resume.wait(timeout=60)

        errors = run_threads([writer(k) for k in range(writers)] + [checker])
        assert not errors, errors
        assert not unexpected, unexpected
        assert all(e > 0 for e in expected_errors)
        assert sum(commits) > 0
        check_paused_state("end")
        # Still usable: a final round trip through every shard.
        t.clear()
        for g in range(len(PAGE_SIZES)):
            assert not t[g].num_pages_per_row.any()
            assert not t.device_snapshot(g).any()


def test_device_tensor_read_racing_commits_is_fresh_once_quiet():
    """A reader thread calls get_device_tensor() while another thread commits. Arrays the
    reader got may be donated by a later commit (documented), but once both threads are
    done, get_device_tensor() must return the committed table."""
    with make_table() as t:
        for trial in range(40):
            stop = threading.Event()

            def writer(trial=trial, stop=stop):
                for i in range(4):
                    t.add_row([[trial * 10 + i + 1], []], (trial * 5 + i * 17) % ROWS)
                    t.commit(ROWS)
                stop.set()

            def reader(stop=stop):
                while not stop.is_set():
                    t[0].get_device_tensor()

            errors = run_threads([writer, reader])
            assert not errors, errors
            dev = np.asarray(t[0].get_device_tensor())  # quiet: no thread runs now
            np.testing.assert_array_equal(dev, t.device_snapshot(0), f"trial {trial}")
