"""How the coordinator's commit cost grows with shards and table size, and where a Ray commit's time goes.

a. Shards: a real ``ShardedPageTable`` (4096 rows, page sizes 16/64, 32k context) with 1..64
   shards whose endpoints live in this process and answer at once (``InstantShards``), so
   only the coordinator's own work is timed: batching, splitting, ``wire.encode``, checksums,
   publishing, reading acks. Every table gets the same decode-like steps (100 row-groups
   appended per commit: 80 in group 0, 20 in group 1).
b. Table size: 1024 x 512 up to 8192 x 8192 pages per row (one group, 4 shards), the same
   100 cells changed per commit, same endpoints.
c. The Ray backend with 1, 2, 4 and 8 shard processes (8 CPU devices split over them),
   blocking commits of the steps of (a).
d. One commit part by part (4 shards; in-process endpoints and Ray), the shards' own apply
   time, and the floors: a loopback TCP echo of the commit's bytes between two Python
   processes and a memcpy of the changed bytes.

The tables of a section are alive together and take their steps in turn (rotating order),
so machine noise falls on all of them alike. A PNG of (a)-(c) goes to ``--png``.

    scripts/dev.sh bench bench_scale            # full run (a few minutes)
    scripts/dev.sh bench bench_scale --quick    # smoke run: 1..8 shards, two sizes, no Ray
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_sharded

# 64 CPU devices, not the usual 8: a 64-shard layout needs a row axis of 64 device blocks
# (set after bench_sharded's 8, which would win otherwise). Only the in-process tables use
# them; the Ray shard processes set their own device counts (8 in total).
jax.config.update("jax_num_cpu_devices", 64)

import sharded_pagetable as sp  # noqa: E402
from sharded_pagetable.routing.layout import ShardLayout  # noqa: E402
from sharded_pagetable.rows.messages import Ack, ShardBatch  # noqa: E402
from sharded_pagetable.shard import wire  # noqa: E402

ROWS, MAX_LEN, PAGE_SIZES, BUDGET = 4096, 32768, (16, 64), 8192
GROWS = (80, 20)  # row-groups appended per commit in each group (~1/page_size of 4096 rows)
SIZE_SHARDS, SIZE_CELLS, SIZE_FILL = 4, 100, 64  # size sweep: shards, cells per commit, fill
SLOPE_TARGET_US, SIZE_TARGET = 15.0, 1.3


class InstantShards:
    """Benchmark harness, not library API: ``num_shards`` shard endpoints in this process
    that answer at once, handed to a table as its backend (``backend=InstantShards(...)``).

    ``send`` encodes every batch with ``wire.encode`` as the Ray backend does before it
    writes its frames, and applies nothing. ``collect`` returns the ``Ack`` a healthy shard
    gives: the epoch sent and the checksum the coordinator computed for that shard (from the
    receipt of ``commit(wait=False)``, handed over with :meth:`expect`), so the coordinator's
    checks run, and pass by construction. It measures the coordinator's cost per commit,
    never correctness. Only the calls a commit makes are served.
    """

    started_shards = True

    def __init__(self, rows: int, num_shards: int) -> None:
        self.layout = ShardLayout(rows, num_shards, num_shards)
        self.mesh_axes = {"data": num_shards}
        self.num_shards = num_shards
        self.generation = 0
        self.frames: list[bytes] = []
        self._receipt: sp.CommitReceipt | None = None

    def status(self) -> list[Ack]:
        return [Ack(s, 0, 0, 0, False, self.generation) for s in range(self.num_shards)]

    def fence(self, generation: int) -> list[Ack]:
        self.generation = generation
        return self.status()

    def expect(self, receipt: sp.CommitReceipt) -> None:
        self._receipt = receipt

    def send(self, batches: Sequence[ShardBatch]) -> None:
        self.frames = [wire.encode(b) for b in batches]

    def collect(self) -> list[Ack]:
        r, self._receipt = self._receipt, None
        g = self.generation
        return [Ack(s.shard, r.epoch, s.checksum, s.rows, True, g) for s in r.shards]

    def rollback(self, shards, epoch, generation):
        raise NotImplementedError("InstantShards never fails a commit, so never rolls back")

    def close(self, clean: bool = True) -> None:
        self.frames = []

    detach = close


_ENDPOINTS: dict[int, InstantShards] = {}  # id(table) -> its instant endpoints


def commit(table, rows: int) -> sp.CommitReceipt:
    """``table.commit(rows)``; on instant endpoints sent, the expected acks handed over,
    then confirmed (what a blocking commit does, through the public calls)."""
    endpoint = _ENDPOINTS.get(id(table))
    if endpoint is None:
        return table.commit(rows)
    receipt = table.commit(rows, wait=False)
    endpoint.expect(receipt)
    return table.wait() or receipt


# -- workloads ---------------------------------------------------------------------------


class Pages:
    """Fresh page ids."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> list[int]:
        self.next += n
        return list(range(self.next - n, self.next))


def decode_steps(seed: int, steps: int, rows: int, grows: Sequence[int]) -> list[tuple]:
    """``steps`` decode-like steps: per step ``sum(grows)`` distinct rows, the first
    ``grows[0]`` get one page in group 0, the next ``grows[1]`` one in group 1, ..."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        who = rng.choice(rows, size=sum(grows), replace=False).tolist()
        group = np.repeat(np.arange(len(grows)), grows).tolist()
        out.append((who, group))
    return out


def fill(table, rows: int, per_group: Sequence[Callable], pages: Pages, rng) -> None:
    """Every row gets ``f(rng)`` pages in each group ``f`` of ``per_group``."""
    for r in range(rows):
        table.add_row([pages.take(f(rng)) for f in per_group], r)


def step_ops(table, step: tuple, groups: int, pages: Pages) -> None:
    who, group = step
    per_req = [[pages.take(1) if gi == g else [] for gi in range(groups)] for g in group]
    table.append_rows_batch(per_req, who)


def instant_table(rows: int, max_len: int, page_sizes: Sequence[int], shards: int):
    endpoint = InstantShards(rows, shards)
    table = sp.ShardedPageTable(
        rows, max_len, BUDGET, page_sizes, num_shards=shards, backend=endpoint, warmup=False
    )
    _ENDPOINTS[id(table)] = endpoint
    return table


def stats(seconds: Sequence[float], cpu: Sequence[float] = ()) -> dict:
    """p50 / p99 wall microseconds, and the p50 of this thread's CPU time when given."""
    us = np.asarray(seconds) * 1e6
    out = {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99))}
    if len(cpu):
        out["cpu_p50_us"] = float(np.percentile(np.asarray(cpu) * 1e6, 50))
    return out


def interleaved(tables: list, steps: list, groups: int, rows: int, parts: bool = False):
    """Time ``commit(rows)`` of every table on every step, the tables taking turns; with
    ``parts`` (in-process endpoints only) every other step is timed part by part instead."""
    pages = [Pages() for _ in tables]
    times: list[list[float]] = [[] for _ in tables]
    cpu: list[list[float]] = [[] for _ in tables]
    nbytes: list[list[int]] = [[] for _ in tables]
    spans: list[dict] = [{k: [] for k, _ in PARTS} for _ in tables]
    gc.collect()
    gc.disable()
    try:
        for i, step in enumerate(steps):
            for k in range(len(tables)):
                j = (i + k) % len(tables)
                table = tables[j]
                step_ops(table, step, groups, pages[j])
                if parts and i % 2:
                    got, _, _ = commit_by_parts(table, rows)
                    for key, s in got.items():
                        spans[j][key].append(s)
                    continue
                c0, t0 = time.thread_time(), time.perf_counter()
                receipt = commit(table, rows)
                times[j].append(time.perf_counter() - t0)
                cpu[j].append(time.thread_time() - c0)
                nbytes[j].append(receipt.bytes)
    finally:
        gc.enable()
    out = []
    for t, c, b, sp_ in zip(times, cpu, nbytes, spans, strict=True):
        r = dict(stats(t, c), bytes=float(np.median(b)))
        if parts:
            r["parts"] = {k: stats(v) for k, v in sp_.items()}
        out.append(r)
    return out


def prefill(tables: list, rows: int, per_group: Sequence[Callable], seed: int) -> None:
    for table in tables:
        fill(table, rows, per_group, Pages(), np.random.default_rng(seed))
        commit(table, rows)


def decode_fill() -> list[Callable]:
    """Rows of 256..8192 tokens (as bench_sharded): pages per group."""
    tokens = []

    def g0(rng):
        tokens.append(int(rng.integers(256, 8192)))
        return sp.cdiv(tokens[-1], PAGE_SIZES[0])

    def g1(rng):
        return sp.cdiv(tokens[-1], PAGE_SIZES[1])

    return [g0, g1]


# -- a. shards, b. table size, e. touched shards -------------------------------------------


TOUCH_ROWS, TOUCH_LEN = 1024, 32768  # e.: one group of page size 16, 2048 pages per row
ONE_TOUCHED_TARGETS = {64: 1.3, 256: 2.0}  # one touched shard: p50 vs 4 shards at most
TOUCHED_SLOPE_TARGET_US = 10.0  # coordinator cost per added touched shard


def touched_table(shards: int, kind: str):
    """A table of ``TOUCH_ROWS`` rows for section e: ``"local"`` (real in-process shards,
    which apply every batch) or ``"instant"`` (endpoints that answer at once: the
    coordinator alone)."""
    if kind == "instant":
        endpoint = InstantShards(TOUCH_ROWS, shards)
        table = sp.ShardedPageTable(
            TOUCH_ROWS, TOUCH_LEN, BUDGET, (16,), num_shards=shards, backend=endpoint,
            warmup=False,
        )  # fmt: skip
        _ENDPOINTS[id(table)] = endpoint
        return table
    return sp.ShardedPageTable(
        TOUCH_ROWS, TOUCH_LEN, BUDGET, (16,), num_shards=shards, warmup=False
    )


def sweep_touched(counts: Sequence[int], kind: str, every: bool, steps: int) -> list[dict]:
    """Per table of ``counts`` shards: a commit that appends one page to one row of shard 0
    (``every=False``) or to one row of every shard (``every=True``); wall and CPU time."""
    tables = [touched_table(n, kind) for n in counts]
    try:
        for t in tables:  # every shard holds rows; every third row is live
            for row in range(0, TOUCH_ROWS, 3):
                t.add_row([[row + 1]], row)
            commit(t, TOUCH_ROWS)
        times: list[list[float]] = [[] for _ in tables]
        cpu: list[list[float]] = [[] for _ in tables]
        gc.collect()
        gc.disable()
        try:
            for i in range(steps):
                for k in range(len(tables)):
                    j = (i + k) % len(tables)
                    t = tables[j]
                    rps = TOUCH_ROWS // t.num_shards
                    for row in range(0, TOUCH_ROWS, rps) if every else (0,):
                        if t[0].num_pages_per_row[row] >= t.widths[0]:
                            t.add_row([[1]], row)
                        else:
                            t.append_row([[i % 1000 + 2]], row)
                    c0, t0 = time.thread_time(), time.perf_counter()
                    receipt = commit(t, TOUCH_ROWS)
                    times[j].append(time.perf_counter() - t0)
                    cpu[j].append(time.thread_time() - c0)
                    assert len(receipt.shards) == (t.num_shards if every else 1)
        finally:
            gc.enable()
    finally:
        for t in tables:
            t.close()
    return [dict(stats(w, c), shards=n) for n, w, c in zip(counts, times, cpu, strict=True)]


def report_touched(counts: Sequence[int], steps: int, targets: list[str]) -> dict:
    """Section e: one touched shard vs every shard touched, 4..256 shards."""
    out = {}
    local = []
    for n in counts:  # several shards may share a device only where the layout allows it
        try:
            touched_table(n, "local").close()
            local.append(n)
        except ValueError as exc:
            print(f"local backend with {n} shards: not built here ({exc})")
    runs = (
        ("one shard touched, local backend (real shards)", "local", False, local),
        ("one shard touched, in-process endpoints (coordinator only)", "instant", False, counts),
        ("every shard touched, in-process endpoints (coordinator only)", "instant", True, counts),
    )
    for label, kind, every, ns in runs:
        try:
            res = sweep_touched(ns, kind, every, steps)
        except Exception as exc:  # e.g. more shards than this JAX can place
            print(f"{label}: skipped ({type(exc).__name__}: {exc})")
            continue
        base = res[0]
        print(f"{label}, {steps} commits per table, interleaved:")
        print(
            f"{'shards':>6} {'p50 us':>9} {'p99 us':>9} {'cpu p50 us':>11} {'vs ' + str(ns[0]):>8}"
        )
        for r in res:
            print(
                f"{r['shards']:>6} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} "
                f"{r['cpu_p50_us']:>11.1f} {r['p50_us'] / base['p50_us']:>7.2f}x"
            )
        key = f"{kind}-{'every' if every else 'one'}"
        out[key] = res
        if not every:
            for r in res:
                limit = ONE_TOUCHED_TARGETS.get(r["shards"])
                if limit is None:
                    continue
                ratio = r["p50_us"] / base["p50_us"]
                targets.append(
                    f"target {label}: {r['shards']} shards <= {limit}x {ns[0]} shards: "
                    f"{ratio:.2f}x -> {'PASS' if ratio <= limit else 'MISS'}"
                )
        else:
            x = np.array([r["shards"] for r in res], float)
            y = np.array([r["cpu_p50_us"] for r in res])
            slope = float(np.polyfit(x, y, 1)[0])
            print(f"added CPU per touched shard (least squares): {slope:.2f} us")
            ok = slope <= TOUCHED_SLOPE_TARGET_US
            targets.append(
                f"target coordinator CPU per added touched shard <= "
                f"{TOUCHED_SLOPE_TARGET_US:.0f} us: {slope:.2f} us -> {'PASS' if ok else 'MISS'}"
            )
            out["every_slope_us"] = slope
        print()
    return out


def sweep_shards(counts: Sequence[int], steps: int) -> list[dict]:
    tables = [instant_table(ROWS, MAX_LEN, PAGE_SIZES, n) for n in counts]
    try:
        prefill(tables, ROWS, decode_fill(), seed=1)
        plan = decode_steps(2, 2 * steps, ROWS, GROWS)
        res = interleaved(tables, plan, len(PAGE_SIZES), ROWS, parts=True)
    finally:
        for t in tables:
            t.close()
    return [dict(r, shards=n) for r, n in zip(res, counts, strict=True)]


def sweep_sizes(sizes: Sequence[tuple[int, int]], steps: int) -> list[dict]:
    out = []
    tables = []
    try:
        for rows, width in sizes:
            tables.append(instant_table(rows, width * 16, (16,), SIZE_SHARDS))
        for table, (rows, _) in zip(tables, sizes, strict=True):
            prefill([table], rows, [lambda rng: SIZE_FILL], seed=3)
        # Every table takes the same rows (all below the smallest table's rows).
        plan = decode_steps(4, steps, min(r for r, _ in sizes), (SIZE_CELLS,))
        pages = [Pages() for _ in tables]
        times: list[list[float]] = [[] for _ in tables]
        gc.collect()
        gc.disable()
        try:
            for i, step in enumerate(plan):
                for k in range(len(tables)):
                    j = (i + k) % len(tables)
                    step_ops(tables[j], step, 1, pages[j])
                    t0 = time.perf_counter()
                    commit(tables[j], sizes[j][0])
                    times[j].append(time.perf_counter() - t0)
        finally:
            gc.enable()
        for (rows, width), t in zip(sizes, times, strict=True):
            out.append(dict(stats(t), rows=rows, pages=width))
    finally:
        for t in tables:
            t.close()
    return out


# -- c. Ray ------------------------------------------------------------------------------


def ray_tables(counts: Sequence[int]) -> list:
    tables = []
    try:
        for n in counts:
            tables.append(bench_sharded.ray_table(n, ROWS))
    except BaseException:
        for t in reversed(tables):
            t.close()
        raise
    return tables


# -- d. one commit part by part ----------------------------------------------------------

PARTS = (
    ("stage", "coordinator: stage (changed rows, split, copy plans)"),
    ("send", "coordinator: send (check, encode, deliver, publish)"),
    ("wait", "coordinator: wait (every ack, checked)"),
)


def commit_by_parts(table, n: int):
    """``table.commit(n)`` for a step without a schedule through its public seam, timing
    each call (``t.stage``, ``t.send(plan, wait=False)``, ``t.wait``); returns
    ``(seconds per part, frames, changed bytes)``: the frames are the plan's messages as
    the wire encodes them (encoded here, outside the timed calls)."""
    endpoint = _ENDPOINTS.get(id(table))
    marks = []

    def mark() -> None:
        marks.append((time.perf_counter(), time.thread_time()))

    mark()
    plan = table.stage(n)
    mark()
    receipt = table.send(plan, wait=False)
    mark()
    if endpoint is not None:
        endpoint.expect(receipt)
    mark()
    table.wait()
    mark()
    frames = [wire.encode(m) for m in plan.messages]
    keys = [k for k, _ in PARTS]
    spans = [(marks[i + 1][0] - marks[i][0], marks[i + 1][1] - marks[i][1]) for i in (0, 1, 3)]
    COMMIT_CPU.append({k: cpu for k, (_, cpu) in zip(keys, spans, strict=True)})
    return (
        {k: wall for k, (wall, _) in zip(keys, spans, strict=True)},
        frames,
        sum(b.nbytes for b in plan.batches),
    )


COMMIT_CPU: list[dict[str, float]] = []  # the CPU seconds of every commit_by_parts call


ECHO_SERVER = r"""
import socket, struct, sys
def exact(c, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = c.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
srv.settimeout(30)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
conn.settimeout(30)
while True:
    head = exact(conn, 4)
    if head is None:
        break
    body = exact(conn, struct.unpack("<I", head)[0])
    if body is None:
        break
    conn.sendall(head + body)
"""


class Echo:
    """A bare loopback TCP peer in another Python process: each frame comes back whole.
    The server exits when the connection closes or idles 30 s."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True
        )
        try:
            port = int(self.proc.stdout.readline())
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.close()
            raise

    def round_trip(self, data: bytes) -> float:
        frame = struct.pack("<I", len(data)) + data
        t0 = time.perf_counter()
        self.sock.sendall(frame)
        got = 0
        while got < len(frame):
            chunk = self.sock.recv(len(frame) - got)
            if not chunk:
                raise ConnectionError("echo server hung up")
            got += len(chunk)
        return time.perf_counter() - t0

    def close(self) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def memcpy_seconds(nbytes: int, reps: int = 20) -> float:
    src = np.frombuffer(os.urandom(max(nbytes, 1)), np.uint8)
    dst = np.empty_like(src)
    t0 = time.perf_counter()
    for _ in range(reps):
        np.copyto(dst, src)
    return (time.perf_counter() - t0) / reps


def breakdown(subjects: dict, iters: int) -> dict:
    """Per subject (name -> table): even steps timed part by part, odd
    steps as a whole ``commit``; the floors measured in the same loop."""
    plan = decode_steps(5, 2 * iters, ROWS, GROWS)
    names = list(subjects)
    parts = {name: {k: [] for k, _ in PARTS} for name in names}
    cpu_parts = {name: {k: [] for k, _ in PARTS} for name in names}
    whole = {name: [] for name in names}
    whole_cpu = {name: [] for name in names}
    applied = {name: [] for name in names}  # per whole commit: the slowest shard's own apply
    decode_s, echo_s, copy_s = [], [], []
    nbytes = {"frames": [], "changed": []}
    pages = {name: Pages() for name in names}
    for name in names:
        pages[name].next = 1 << 28  # far from the ids the table already holds
    echo = Echo()
    limits = wire.WireLimits(ROWS // 4, tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES))
    gc.collect()
    gc.disable()
    try:
        for i, step in enumerate(plan):
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                table = subjects[name]
                step_ops(table, step, len(PAGE_SIZES), pages[name])
                if i % 2:
                    c0, t0 = time.thread_time(), time.perf_counter()
                    receipt = commit(table, ROWS)
                    whole[name].append(time.perf_counter() - t0)
                    whole_cpu[name].append(time.thread_time() - c0)
                    applied[name].append(max(s.apply_us for s in receipt.shards) / 1e6)
                    continue
                spans, frames, changed = commit_by_parts(table, ROWS)
                for key, s in spans.items():
                    parts[name][key].append(s)
                    cpu_parts[name][key].append(COMMIT_CPU[-1][key])
                if k == 0:
                    blob = b"".join(frames)
                    nbytes["frames"].append(len(blob))
                    nbytes["changed"].append(changed)
                    echo_s.append(echo.round_trip(blob))
                    copy_s.append(memcpy_seconds(changed))
                    t0 = time.perf_counter()
                    for f in frames:
                        wire.decode(f, limits)
                    decode_s.append((time.perf_counter() - t0) / len(frames))
    finally:
        gc.enable()
        echo.close()
    out = {"subjects": {}, "floors": {}}
    for name in names:
        rows = {k: stats(v, cpu_parts[name][k]) for k, v in parts[name].items()}
        total = np.sum([parts[name][k] for k, _ in PARTS], axis=0)
        total_cpu = np.sum([cpu_parts[name][k] for k, _ in PARTS], axis=0)
        rows["sum"] = stats(total, total_cpu)
        rows["whole"] = stats(whole[name], whole_cpu[name])
        rows["shard_apply"] = stats(applied[name])
        out["subjects"][name] = rows
    out["floors"] = {
        "decode": stats(decode_s),
        "echo": stats(echo_s),
        "memcpy": stats(copy_s),
        "frame_bytes": float(np.median(nbytes["frames"])),
        "changed_bytes": float(np.median(nbytes["changed"])),
    }
    return out


# -- output ------------------------------------------------------------------------------


def fmt(r: dict | None) -> str:
    """``p50 / p99`` wall microseconds, then this thread's CPU p50 where it was measured."""
    if r is None:
        return "-"
    cpu = f" cpu {r['cpu_p50_us']:7.1f}" if "cpu_p50_us" in r else ""
    return f"{r['p50_us']:8.1f} / {r['p99_us']:8.1f}{cpu}"


def plot(path: str, shards: list, ray_res: list, sizes: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(
        [r["shards"] for r in shards], [r["p50_us"] for r in shards], "o-",
        label="in-process endpoints (coordinator only)",
    )  # fmt: skip
    if ray_res:
        ax1.plot(
            [r["shards"] for r in ray_res], [r["p50_us"] for r in ray_res], "s-",
            label="Ray backend, blocking (shard processes x 8/n devices)",
        )  # fmt: skip
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ticks = sorted({r["shards"] for r in shards + ray_res})
    ax1.set_xticks(ticks, [str(t) for t in ticks])
    ax1.set_xlabel("shards")
    ax1.set_ylabel("commit p50 (us)")
    ax1.set_title(f"{ROWS} rows, {sum(GROWS)} row-groups appended per commit")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    cells = [r["rows"] * r["pages"] for r in sizes]
    ax2.plot(cells, [r["p50_us"] for r in sizes], "o-", label="in-process endpoints")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(cells, [f"{r['rows']}x{r['pages']}" for r in sizes])
    ax2.set_ylim(0, max(r["p50_us"] for r in sizes) * 1.4)
    ax2.set_xlabel("table: rows x pages per row (log of cells)")
    ax2.set_ylabel("commit p50 (us)")
    ax2.set_title(f"one group, {SIZE_SHARDS} shards, {SIZE_CELLS} cells changed per commit")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="timed commits per table")
    parser.add_argument("--quick", action="store_true", help="1..8 shards, two sizes, no Ray")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument(
        "--only-touched", action="store_true", help="section e only (touched shards)"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--png", default=os.path.join("out", "bench_scale.png"))
    args = parser.parse_args()
    quick = args.quick
    steps = 60 if quick else args.steps
    counts = (1, 2, 4, 8) if quick else (1, 2, 4, 8, 16, 32, 64)
    sizes = [(1024, 512), (2048, 2048)]
    if not quick:
        sizes += [(4096, 4096), (8192, 8192)]
    with_ray = not (quick or args.no_ray)
    doc: dict = {"meta": {"rows": ROWS, "max_model_len": MAX_LEN, "page_sizes": PAGE_SIZES}}
    targets: list[str] = []
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start")
    print()
    print(
        f"e. what a commit costs with the shards it touches: {TOUCH_ROWS} rows, one group "
        f"(page size 16, {TOUCH_LEN // 16} pages per row), one page appended per touched shard"
    )
    touched_counts = (4, 16, 64) if quick else (4, 16, 64, 256)
    doc["touched"] = report_touched(touched_counts, 60 if quick else steps // 2, targets)
    if args.only_touched:
        for line in targets:
            print(line)
        return

    print(
        f"a. coordinator cost per commit vs shards (in-process endpoints that answer at once): "
        f"{ROWS} rows, page sizes {PAGE_SIZES}, max_model_len {MAX_LEN}, "
        f"{sum(GROWS)} row-groups appended per commit, {steps} whole commits per table, "
        "interleaved"
    )
    shards = sweep_shards(counts, steps)
    print(f"{'shards':>6} {'p50 us':>9} {'p99 us':>9} {'bytes':>8} {'vs 1 shard':>11}")
    for r in shards:
        print(
            f"{r['shards']:>6} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['bytes']:>8.0f} "
            f"{r['p50_us'] / shards[0]['p50_us']:>10.2f}x"
        )
    x = np.array([r["shards"] for r in shards], float)
    y = np.array([r["p50_us"] for r in shards])
    fit = float(np.polyfit(x, y, 1)[0])
    slope = float((y[-1] - y[0]) / (x[-1] - x[0]))
    print(f"added cost per shard: {slope:.2f} us ({counts[0]} -> {counts[-1]} shards, p50), "
          f"least-squares fit {fit:.2f} us")  # fmt: skip
    print()
    print(f"the same tables on the other {steps} steps, timed part by part (p50 us):")
    print(f"{'part':<46}" + "".join(f"{n:>8}" for n in counts) + f"{'us/shard':>10}")
    part_slopes = {}
    for key, label in PARTS:
        p50 = [r["parts"][key]["p50_us"] for r in shards]
        part_slopes[key] = (p50[-1] - p50[0]) / (counts[-1] - counts[0])
        cells = "".join(f"{v:>8.1f}" for v in p50)
        print(f"{label:<46}{cells}{part_slopes[key]:>10.2f}")
    ok = slope <= SLOPE_TARGET_US
    targets.append(
        f"target coordinator cost grows <= {SLOPE_TARGET_US:.0f} us per added shard "
        f"({counts[0]}..{counts[-1]} shards): {slope:.2f} us -> {'PASS' if ok else 'MISS'}"
    )
    doc["shards"] = dict(
        rows=shards, slope_us=slope, fit_slope_us=fit, part_slopes_us=part_slopes, passed=ok
    )

    print()
    print(
        f"b. coordinator cost per commit vs table size (one group, page size 16, "
        f"{SIZE_SHARDS} shards, {SIZE_CELLS} cells appended per commit, rows filled with "
        f"{SIZE_FILL} pages), interleaved"
    )
    size_res = sweep_sizes(sizes, steps)
    print(f"{'rows x pages':>14} {'MiB':>6} {'p50 us':>9} {'p99 us':>9} {'vs smallest':>12}")
    for r in size_res:
        mib = r["rows"] * r["pages"] * 4 / 2**20
        print(
            f"{r['rows']:>6} x {r['pages']:<5} {mib:>6.0f} {r['p50_us']:>9.1f} "
            f"{r['p99_us']:>9.1f} {r['p50_us'] / size_res[0]['p50_us']:>11.2f}x"
        )
    ratio = size_res[-1]["p50_us"] / size_res[0]["p50_us"]
    ok = ratio <= SIZE_TARGET
    first, last = size_res[0], size_res[-1]
    targets.append(
        f"target coordinator cost <= {SIZE_TARGET}x from {first['rows']}x{first['pages']} to "
        f"{last['rows']}x{last['pages']} (same cells changed): {ratio:.2f}x -> "
        f"{'PASS' if ok else 'MISS'}"
    )
    doc["sizes"] = dict(rows=size_res, ratio=ratio, passed=ok)

    ray_res: list[dict] = []
    subjects: dict = {}
    tables: list = []
    instant4 = instant_table(ROWS, MAX_LEN, PAGE_SIZES, 4)
    subjects["in-process x4"] = instant4
    owns_ray = False
    try:
        if with_ray:
            import ray

            from ray_actors.cluster import start_local

            ray_counts = (1, 2, 4, 8)
            print()
            print(
                f"c. Ray backend, blocking commit: n shard processes x 8/n CPU devices, the "
                f"steps of (a), {steps // 2} commits per table, interleaved"
            )
            try:
                if not ray.is_initialized():
                    start_local("sharded_pagetable")
                    owns_ray = True
                t0 = time.perf_counter()
                tables = ray_tables(ray_counts)
                print(f"(started {len(tables)} tables, {sum(ray_counts)} shard processes in "
                      f"{time.perf_counter() - t0:.1f} s)")  # fmt: skip
                prefill(tables, ROWS, decode_fill(), seed=1)
                plan = decode_steps(2, steps // 2, ROWS, GROWS)  # Ray start-up takes most
                res = interleaved(tables, plan, len(PAGE_SIZES), ROWS)
                ray_res = [dict(r, shards=n) for r, n in zip(res, ray_counts, strict=True)]
                print(f"{'processes':>9} {'devices':>7} {'p50 us':>9} {'p99 us':>9} {'bytes':>8}")
                for r in ray_res:
                    print(
                        f"{r['shards']:>9} {8 // r['shards']:>7} {r['p50_us']:>9.1f} "
                        f"{r['p99_us']:>9.1f} {r['bytes']:>8.0f}"
                    )
                ray4 = tables[ray_counts.index(4)]
                subjects["ray 4 proc x 2 dev"] = ray4
            except Exception as exc:  # the rest of the report still stands
                print(f"Ray part failed: {type(exc).__name__}: {exc}")
        doc["ray"] = ray_res

        iters = 30 if quick else 300
        print()
        print(
            f"d. one commit part by part, 4 shards, {iters} commits timed by parts and "
            f"{iters} whole (alternating, interleaved); p50 / p99 us"
        )
        prefill([instant4], ROWS, decode_fill(), seed=1)
        parts = breakdown(subjects, iters)
        if "ray 4 proc x 2 dev" in parts["subjects"]:
            parts["shard_apply"] = parts["subjects"]["ray 4 proc x 2 dev"]["shard_apply"]
        doc["breakdown"] = parts
    finally:
        instant4.close()
        for t in reversed(tables):
            t.close()
        if owns_ray:
            import ray

            ray.shutdown()

    names = list(parts["subjects"])
    head = "".join(f"{n:>34}" for n in names)
    print(f"{'part':<50}{head}")
    rows = [(label, key) for key, label in PARTS]
    rows += [("sum of the parts", "sum"), ("whole commit (t.commit, other steps)", "whole")]
    for label, key in rows:
        cells = "".join(f"{fmt(parts['subjects'][n][key]):>34}" for n in names)
        print(f"{label:<50}{cells}")
    fl = parts["floors"]
    print()
    print(f"{'shard side and floors (same loop)':<50}{'p50 / p99 us':>22}")
    extra = [
        ("shard: apply in its process (slowest of 4, Ray)", parts.get("shard_apply")),
        ("shard: wire.decode of its frame (timed here)", fl["decode"]),
        (f"floor: loopback TCP echo of {fl['frame_bytes']:.0f} B", fl["echo"]),
        (f"floor: memcpy of the {fl['changed_bytes']:.0f} changed B", fl["memcpy"]),
    ]
    for label, r in extra:
        print(f"{label:<50}{fmt(r):>22}")

    plot(args.png, shards, ray_res, size_res)
    print()
    print(f"plot: {args.png}; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for line in targets:
        print(line)
    doc["targets"] = targets
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
