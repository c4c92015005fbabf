"""One shard's commit frame, part by part, in CPU time and wall time: an older commit against
this checkout, side by side in one run.

A shard process of the Ray backend spends a commit on one frame: it receives it over its
channel and checks the MAC, decodes it, checks it, applies its rows (kernels), tells its
devices the changed cells, advances its step state and answers with an ack (built, encoded,
MACed and sent). Here one shard of the ``bench_sharded`` decode-like workload (4 shards x
2 devices: this shard holds 256 rows on 2 CPU devices of 128 rows each) is fed the stream
of wire frames its coordinator sends, over a loopback TCP connection, through the same
frame handling the shard actor runs (the channel's framer and the actor's frame handler),
with a pause between frames as at commit cadence: on this machine an idle pause of ~1.5 ms
makes the same code 2-4x more expensive than back to back (caches gone cold), and the
issue's figures are at that cadence.

The older commit's packages are exported under other names (as ``bench_ab`` does), both
shards are built side by side in this process and take the same frames in turn. Every other
frame is timed part by part (each part's function wrapped with clocks), the frames between
as a whole (no wrappers), so the totals carry no probe overhead. CPU is the serving thread's
own (``time.thread_time``); "process" is every thread's CPU but the driver's.

    scripts/dev.sh bench bench_frame                       # HEAD vs this checkout
    scripts/dev.sh bench bench_frame --base 63da85e --frames 600 --gap-ms 1.5
    scripts/dev.sh bench bench_frame --gap-ms 0            # back to back, for comparison
    scripts/dev.sh bench bench_frame --device-options      # (b) device-update options too
    scripts/dev.sh bench bench_frame --variants            # (c) XLA / JAX flags, subprocesses
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE), str(HERE / "scripts")]
import bench_ab  # noqa: E402  (exports an older commit's packages under other names)
import bench_sharded  # noqa: E402  (the decode-like workload; it asks for 8 devices)

jax.config.update("jax_num_cpu_devices", 2)  # what a shard process of the 4 x 2 layout has

ROWS, SHARDS, BLOCKS = bench_sharded.ROWS, 4, 8  # the 4 processes x 2 devices table
DEVICES = BLOCKS // SHARDS
KEY = bytes(range(32))  # the channel key of both connections (the handshake is not timed)
PARTS = (
    ("recv", "receive + MAC"),
    ("mac", "  MACs (request and ack)"),
    ("decode", "decode"),
    ("checks", "checks"),
    ("kernels", "kernels (apply + undo)"),
    ("frame", "read+check+apply, one call"),
    ("device", "device update"),
    ("dispatch", "  of which jitted dispatches"),
    ("step", "step state"),
    ("ack", "ack build + encode"),
    ("send", "ack MAC + send"),
    ("other", "other (lock, glue, timing)"),
)
NOT_IN_HANDLER = ("recv", "send", "mac", "dispatch", "other")  # nested: mac, dispatch
TARGET_US = 250.0


# -- the frames -------------------------------------------------------------------------


def capture_batches(sp, frames: int, shard: int, seed: int) -> list:
    """``frames`` consecutive commits of ``bench_sharded``'s decode-like steps on a 4-shard
    table of package ``sp``, as the ``ShardBatch`` values its coordinator sends shard
    ``shard`` (the first is the initial fill)."""
    layout_mod = importlib.import_module(sp.__name__ + ".routing.layout")
    messages = importlib.import_module(sp.__name__ + ".rows.messages")

    class Capture:
        """Shards that answer at once with what the coordinator expects (the receipt's
        checksums), keeping what was sent to one shard."""

        started_shards = True

        def __init__(self) -> None:
            self.layout = layout_mod.ShardLayout(ROWS, SHARDS, BLOCKS)
            self.mesh_axes = {"data": BLOCKS}
            self.num_shards = SHARDS
            self.generation = 0
            self.sent: list = []
            self.receipt = None

        def status(self):
            return [messages.Ack(s, 0, 0, 0, False, self.generation) for s in range(SHARDS)]

        def fence(self, generation: int):
            self.generation = generation
            return self.status()

        def send(self, batches) -> None:
            self.sent.append(batches[shard])

        def collect(self):
            r, g = self.receipt, self.generation
            return [messages.Ack(s.shard, r.epoch, s.checksum, s.rows, True, g) for s in r.shards]

        def close(self, clean: bool = True) -> None:
            pass

        detach = close

    backend = Capture()
    table = sp.ShardedPageTable(
        ROWS, bench_sharded.MAX_LEN, bench_sharded.BUDGET, bench_sharded.PAGE_SIZES,
        num_shards=SHARDS, backend=backend, warmup=False,
    )  # fmt: skip
    init, plan = bench_sharded.make_steps(seed, frames - 1, ROWS, ROWS // SHARDS)
    for ops in [init, *(ops for ops, _ in plan)]:
        bench_sharded.apply(table, ops)
        backend.receipt = table.commit(ROWS, wait=False)
        table.wait()
    table.close()
    return backend.sent


def as_shard_zero(sp, batch):
    """``batch`` (any version's) as package ``sp``'s ``ShardBatch`` addressed to shard 0:
    the benchmark's shard is shard 0 of a one-shard layout with the same 2 device blocks."""
    messages = importlib.import_module(sp.__name__ + ".rows.messages")
    groups = tuple(
        messages.GroupBatch(g.op, g.row, g.start, g.count, g.pages) for g in batch.groups
    )
    return messages.ShardBatch(batch.epoch, batch.base, 0, groups, batch.generation)


# -- one version's shard, channel and frame handler --------------------------------------


class Subject:
    """One version's shard (package ``sp``, actor package ``ray_pkg``) behind a loopback
    TCP connection, served by a thread running the channel's framer and the actor's frame
    handling; ``parts`` maps a part to the functions whose time it is."""

    def __init__(self, name: str, sp, ray_pkg, handler_kind: str) -> None:
        self.name = name
        self.sp = sp
        mod = functools.partial(importlib.import_module)
        self.shard_mod = mod(sp.__name__ + ".shard.shard")
        self.wire = mod(sp.__name__ + ".shard.wire")
        step_mod = mod(sp.__name__ + ".shard.step")
        layout = mod(sp.__name__ + ".routing.layout").ShardLayout(ROWS // SHARDS, 1, DEVICES)
        mesh = mod(sp.__name__ + ".routing.mesh")
        widths = tuple(sp.cdiv(bench_sharded.MAX_LEN, s) for s in bench_sharded.PAGE_SIZES)
        step = step_mod.StepConfig(bench_sharded.PAGE_SIZES, bench_sharded.BUDGET // SHARDS)
        spec = self.shard_mod.ShardSpec(0, layout, widths, True, step)
        sharding = mesh.row_sharding(mesh.build_mesh({"data": DEVICES}, "data"), "data")
        self.shard = self.shard_mod.Shard(spec, sharding)
        self.channel = mod(ray_pkg + ".channel")
        actor_mod = mod(ray_pkg + ".shard_actor")
        self.probe = Probe()
        self.parts = self._parts(step_mod.StepState)
        self.probe.install(self.parts)  # FrameHandler binds encode_reply when built
        self.handler = self._handler(actor_mod, handler_kind)
        self.probe.remove()
        self.records: collections.deque = collections.deque()
        self._ready = threading.Semaphore(0)
        self._connect()

    def _parts(self, step_state) -> dict:
        Shard, shard_mod, wire = self.shard_mod.Shard, self.shard_mod, self.wire
        kernels = importlib.import_module(self.sp.__name__ + ".rows.kernels")
        device = importlib.import_module(self.sp.__name__ + ".rows.device")
        parts = {
            "mac": [(self.channel._Framer, "_tag")],
            "checks": [(Shard, "_check"), (Shard, "_obey")],
            "step": [(step_state, "saved"), (step_state, "advance")],
            "ack": [(Shard, "_ack"), (wire, "encode_reply")],
        }
        if hasattr(Shard, "_apply_rows"):  # this checkout
            parts.update(  # a frame that fits takes apply_frame, the rest the other calls
                frame=[(shard_mod, "apply_frame")],
                decode=[(shard_mod, "decode_columns"), (shard_mod, "batch_of")],
                kernels=[(Shard, "_apply_rows"), (Shard, "_undo_of")],
                device=[(Shard, "_publish")],
                dispatch=[(device, "_put_packed")],
            )
        else:  # the code before it: one kernel call per group, undo built between
            parts.update(
                decode=[(shard_mod, "decode")],
                kernels=[(kernels, "apply_batch")],
                device=[(shard_mod, "update_groups")],
                dispatch=[(device, "_put_cells_groups")],
            )
            parts["checks"].append((shard_mod, "check_appends"))
            parts["checks"].remove((Shard, "_check"))  # it calls check_appends: no nesting
            parts["checks"].append((Shard, "_check"))
        return parts

    def _handler(self, actor_mod, kind: str):
        lock = threading.Lock()
        if kind == "frames" or hasattr(actor_mod, "FrameHandler"):  # the handler the actor
            # hands its channel (this checkout, or a base that has one too)
            return actor_mod.FrameHandler(self.shard, lock, collections.deque(maxlen=16))
        actor = actor_mod.ShardActor.__new__(actor_mod.ShardActor)  # the older actor
        actor.shard_id, actor._shard, actor._lock = 0, self.shard, lock
        actor._apply_s = collections.deque(maxlen=16)
        return actor._serve_frame

    def _connect(self) -> None:
        ch = self.channel
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname()[:2], timeout=10)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server, _ = listener.accept()
        listener.close()
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Both ends as after the handshake (ShardServer._serve / ShardClient).
        self.server = ch._Framer(ch._Stream(server), KEY, ch._TO_CLIENT, ch._TO_SERVER)
        self.client = ch._Framer(ch._Stream(client), KEY, ch._TO_SERVER, ch._TO_CLIENT)
        self._socks = (client, server)
        self.max_bytes = self.shard.limits.max_bytes + 64
        self.thread = threading.Thread(target=self._serve, name=f"frames-{self.name}")
        self.thread.daemon = True
        self.thread.start()
        self.probe.thread = self.thread.ident

    def _serve(self) -> None:
        """ShardServer._serve's loop, with clocks between its calls."""
        clock, cpu = time.perf_counter_ns, time.thread_time_ns
        framer, handler = self.server, self.handler
        try:
            while True:
                c0 = cpu()
                request = framer.recv_after_idle(self.max_bytes, 10.0)
                c1, w1 = cpu(), clock()
                reply = handler(request)
                c2, w2 = cpu(), clock()
                framer.send(reply, 10.0)
                c3, w3 = cpu(), clock()
                self.records.append((c1 - c0, w1, c2 - c1, w2 - w1, c3 - c2, w3 - w2, c3 - c0))
                self._ready.release()
        except (OSError, self.channel.ChannelClosedError):
            return

    def frame(self, message: bytes, parts: bool) -> dict:
        """Send one frame, wait for its ack; the serving thread's clocks, per part."""
        if parts:
            self.probe.install(self.parts)
        cpu_main, cpu_all = time.thread_time_ns(), time.process_time_ns()
        sent = time.perf_counter_ns()
        self.client.send(message, 10.0)
        reply = self.client.recv(1 << 16, time.monotonic() + 10.0)
        self._ready.acquire()
        process = time.process_time_ns() - cpu_all - (time.thread_time_ns() - cpu_main)
        if parts:
            self.probe.remove()
        ack = self.wire.decode_reply(reply, 1)
        if not getattr(ack, "applied", False):
            raise RuntimeError(f"{self.name}: the shard did not apply a frame: {ack}")
        recv_cpu, w1, handle_cpu, handle_wall, send_cpu, send_wall, total_cpu = (
            self.records.popleft()
        )
        out = {"total": (total_cpu, w1 - sent + handle_wall + send_wall), "process": process}
        if parts:
            got = self.probe.take()
            inner = [got.get(k, (0, 0)) for k, _ in PARTS if k not in NOT_IN_HANDLER]
            out.update(got)
            out["recv"] = (recv_cpu, w1 - sent)
            out["send"] = (send_cpu, send_wall)
            out["other"] = (
                handle_cpu - sum(c for c, _ in inner),
                handle_wall - sum(w for _, w in inner),
            )
        return out

    def close(self) -> None:
        for s in self._socks:
            s.close()


class Probe:
    """Clocks around functions (installed only on the frames timed part by part)."""

    def __init__(self) -> None:
        self.acc: dict[str, list[int]] = {}
        self._saved: list[tuple] = []
        self.thread: int | None = None  # only calls on this thread count (the server's)

    def install(self, parts: dict) -> None:
        for part, targets in parts.items():
            for owner, attr in targets:
                fn = getattr(owner, attr)
                self._saved.append((owner, attr, fn))
                setattr(owner, attr, self._wrap(part, fn))

    def remove(self) -> None:
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)
        self._saved.clear()

    def take(self) -> dict[str, tuple[int, int]]:
        out = {k: (v[0], v[1]) for k, v in self.acc.items()}
        self.acc.clear()
        return out

    def _wrap(self, part: str, fn):
        acc, cpu, clock = self.acc, time.thread_time_ns, time.perf_counter_ns
        probe, ident = self, threading.get_ident

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if ident() != probe.thread:
                return fn(*args, **kwargs)
            c0, w0 = cpu(), clock()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = acc.setdefault(part, [0, 0])
                entry[0] += cpu() - c0
                entry[1] += clock() - w0

        return timed


# -- (a) the frame, part by part ------------------------------------------------------------


def run_frames(subjects: list[Subject], streams: dict, gap_s: float, skip: int) -> dict:
    """Every frame to every subject in turn, a pause before each. The order stays fixed, so
    each subject's frame always follows the other's (what ran just before changes what is
    still in cache)."""
    n = len(next(iter(streams.values())))
    res = {
        s.name: {"parts": collections.defaultdict(list), "whole": [], "process": []}
        for s in subjects
    }
    gc.collect()
    gc.disable()
    try:
        for i in range(n):
            for s in subjects:
                if gap_s:
                    time.sleep(gap_s)
                got = s.frame(streams[s.name][i], parts=i % 2 == 1)
                if i < skip:
                    continue
                r = res[s.name]
                if i % 2:
                    for key, _ in PARTS:
                        r["parts"][key].append(got.get(key, (0, 0)))
                else:
                    r["whole"].append(got["total"])
                    r["process"].append(got["process"])
    finally:
        gc.enable()
    return res


def p50(pairs, i: int) -> float:
    return float(np.median([p[i] for p in pairs])) / 1e3 if pairs else float("nan")


def report(res: dict, names: list[str]) -> dict:
    """Print the per-part table; returns its figures (p50 us) for ``--json``."""
    base, head = names
    out = {"parts": {}, "names": names}
    print(f"{'part (p50 us)':<32}{'base cpu':>10}{'new cpu':>10}{'ratio':>8}"
          f"{'base wall':>11}{'new wall':>10}")  # fmt: skip
    rows = [(label, res[base]["parts"][k], res[head]["parts"][k]) for k, label in PARTS]
    joint = ("decode", "checks", "kernels", "frame")  # what the one-call path replaced
    for who in names:
        parts = res[who]["parts"]
        parts["joint"] = [tuple(map(sum, zip(*t, strict=True))) for t in zip(
            *(parts[k] for k in joint), strict=True)]  # fmt: skip
    at = [k for k, _ in PARTS].index("frame") + 1
    rows.insert(at, ("  decode..apply, together", res[base]["parts"]["joint"],
                     res[head]["parts"]["joint"]))  # fmt: skip
    for label, b, h in rows:
        bc, hc, bw, hw = p50(b, 0), p50(h, 0), p50(b, 1), p50(h, 1)
        ratio = f"{hc / bc:>7.2f}x" if bc > 0 else f"{'-':>8}"
        print(f"{label:<32}{bc:>10.1f}{hc:>10.1f}{ratio}{bw:>11.1f}{hw:>10.1f}")
        out["parts"][label.strip()] = {"base_cpu": bc, "new_cpu": hc, "base_wall": bw,
                                       "new_wall": hw}  # fmt: skip
    sums = {}
    for who in names:
        parts = res[who]["parts"]
        summed = [k for k, _ in PARTS if k not in ("dispatch", "mac")]
        cpu = np.sum([[c for c, _ in parts[k]] for k in summed], axis=0)
        wall = np.sum([[w for _, w in parts[k]] for k in summed], axis=0)
        sums[who] = (np.median(cpu) / 1e3, np.median(wall) / 1e3)
    b, h = sums[base], sums[head]
    print(f"{'sum of parts (probed frames)':<32}{b[0]:>10.1f}{h[0]:>10.1f}{h[0] / b[0]:>7.2f}x"
          f"{b[1]:>11.1f}{h[1]:>10.1f}")  # fmt: skip
    bc, hc = p50(res[base]["whole"], 0), p50(res[head]["whole"], 0)
    bw, hw = p50(res[base]["whole"], 1), p50(res[head]["whole"], 1)
    print(f"{'whole frame (no probes)':<32}{bc:>10.1f}{hc:>10.1f}{hc / bc:>7.2f}x"
          f"{bw:>11.1f}{hw:>10.1f}")  # fmt: skip
    bp = float(np.median(res[base]["process"])) / 1e3
    hp = float(np.median(res[head]["process"])) / 1e3
    print(f"{'  process CPU, every thread':<32}{bp:>10.1f}{hp:>10.1f}{hp / bp:>7.2f}x")
    for who in names:
        whole = np.array([c for c, _ in res[who]["whole"]]) / 1e3
        print(f"  {who}: whole-frame CPU p90 {np.percentile(whole, 90):.1f} us, "
              f"p99 {np.percentile(whole, 99):.1f} us over {whole.size} frames")  # fmt: skip
    verdict = "PASS" if hc <= TARGET_US else "MISS"
    print(f"target: a shard frame <= {TARGET_US:.0f} us of CPU p50 (issue 19): "
          f"{hc:.0f} us -> {verdict}; {bc / hc:.2f}x less than the base here")  # fmt: skip
    out["whole"] = {"base_cpu": bc, "new_cpu": hc, "base_wall": bw, "new_wall": hw,
                    "base_process": bp, "new_process": hp}  # fmt: skip
    out["target"] = {"limit_us": TARGET_US, "value_us": hc, "pass": hc <= TARGET_US}
    return out


def check_same(subjects: list[Subject]) -> None:
    """Both shards hold the same rows, on the host and on their devices."""
    a, b = (s.shard for s in subjects)
    if a.checksum != b.checksum or a.epoch != b.epoch:
        raise AssertionError(f"checksums differ: {a.checksum} vs {b.checksum}")
    for g in range(len(a.tables)):
        for s in (a, b):
            np.testing.assert_array_equal(s.snapshot(g), s.tables[g], f"group {g} devices")
        np.testing.assert_array_equal(a.tables[g], b.tables[g], f"group {g}")


# -- (b) device-update options ---------------------------------------------------------------


def device_options(frames: list, widths: tuple, gap_s: float, skip: int) -> None:
    """The device update of each frame (its packed cells, as the new apply makes them) by
    each option, in turn, a pause before each; every option's buffers are checked against
    the host tables at the end."""
    import jax.numpy as jnp  # noqa: F401
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import sharded_pagetable as sp
    from sharded_pagetable.rows import device
    from sharded_pagetable.rows.checksum import GroupConsts
    from sharded_pagetable.shard import frame, wire

    n, block = ROWS // SHARDS, ROWS // BLOCKS
    devs = jax.devices()[:DEVICES]
    tables = [np.zeros((n, w), np.int32) for w in widths]
    counts = [np.zeros(n, np.int32) for _ in widths]
    inner = [np.zeros(n, np.uint64) for _ in widths]
    consts = [GroupConsts.build(g, w, n) for g, w in enumerate(widths)]
    state = (tuple(tables), tuple(counts), tuple(inner), frame.Consts.of(consts))
    limits = wire.WireLimits(n, widths)
    geometry = (block, DEVICES, np.array(device.CELL_BUCKETS, np.int64))
    mesh = Mesh(np.array(devs), ("data",))
    rows_spec = P("data", None)
    G = len(widths)

    def body(bufs, packed):
        return device._put_packed.__wrapped__(bufs, packed[0])

    fused = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=((rows_spec,) * G, P("data")),
                      out_specs=(rows_spec,) * G),
        donate_argnums=0,
    )  # fmt: skip
    table_sharding = NamedSharding(mesh, rows_spec)

    def zeros_per_device():
        return [
            tuple(jax.device_put(np.zeros((block, w), np.int32), d) for w in widths) for d in devs
        ]

    state_of = {"per_device": zeros_per_device(), "old": zeros_per_device(), "put": None}
    state_of["shard_map"] = tuple(
        jax.device_put(np.zeros((n, w), np.int32), table_sharding) for w in widths
    )

    def per_device(packed, touched):
        bufs = state_of["per_device"]
        for b in touched.tolist():
            bufs[b] = device._put_packed(bufs[b], packed[b])

    def old_two_args(packed, touched):
        bufs = state_of["old"]
        k = (packed.shape[1] - G) // (3 * G)
        for b in touched.tolist():
            rcv = np.ascontiguousarray(packed[b, G:].reshape(G, 3, k))
            ks = np.ascontiguousarray(packed[b, :G])
            bufs[b] = device._put_cells_groups(bufs[b], rcv, ks)

    def shard_map(packed, touched):
        state_of["shard_map"] = fused(state_of["shard_map"], packed)

    def put_blocks(packed, touched):
        blocks = [np.array(t[b * block : (b + 1) * block]) for b in range(DEVICES) for t in tables]
        out = jax.device_put(blocks, [d for d in devs for _ in widths])
        state_of["put"] = [tuple(out[b * G : (b + 1) * G]) for b in range(DEVICES)]

    # jaxlib's own put (what device_put ends in): a fresh copy of each touched block, aliased
    # by its device buffer (no copy on CPU), the old buffer deleted as donation would.
    from jax._src import core
    from jax._src.lib import xla_client as xc

    one = [jax.sharding.SingleDeviceSharding(d) for d in devs]
    avals = [core.ShapedArray((block, w), np.dtype(np.int32)) for w in widths]
    state_of["alias"] = zeros_per_device()

    def alias_blocks(packed, touched):
        for b in touched.tolist():
            old, new = state_of["alias"][b], []
            for g, t in enumerate(tables):
                copy = np.array(t[b * block : (b + 1) * block])
                new.append(xc.batched_device_put(avals[g], one[b], [copy], [devs[b]], True))
                old[g].delete()
            state_of["alias"][b] = tuple(new)

    options = {
        "per device, packed (kept)": per_device,
        "per device, rcv + ks (before)": old_two_args,
        "one shard_map over both": shard_map,
        "device_put of whole blocks": put_blocks,
        "jaxlib put of blocks, no jit": alias_blocks,
    }
    times = {k: [] for k in options}
    names = list(options)
    gc.disable()
    try:
        for i, message in enumerate(frames):
            _, cols, offs = wire.decode_columns(message, limits)
            applied = frame.apply_groups(*state, cols, offs, geometry)
            if not applied.packed.size:  # the initial fill: every option starts from it
                for o in ("per_device", "old", "alias"):
                    state_of[o] = [
                        tuple(jax.device_put(np.array(t[b * block : (b + 1) * block]), d)
                              for t in tables)
                        for b, d in enumerate(devs)
                    ]  # fmt: skip
                state_of["shard_map"] = tuple(jax.device_put(t, table_sharding) for t in tables)
                continue
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                jax.block_until_ready(
                    [state_of["per_device"], state_of["old"], state_of["shard_map"]]
                )
                if gap_s:
                    time.sleep(gap_s)
                c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
                p0 = time.process_time_ns()
                options[name](applied.packed, applied.touched)
                c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
                jax.block_until_ready(
                    [state_of["per_device"], state_of["old"], state_of["shard_map"]]
                )
                p1 = time.process_time_ns()
                if i >= skip:
                    times[name].append((c1 - c0, w1 - w0, p1 - p0))
    finally:
        gc.enable()
    for name in ("per_device", "old", "alias"):
        got = [np.concatenate([np.asarray(bufs[g]) for bufs in state_of[name]]) for g in range(G)]
        for g in range(G):
            np.testing.assert_array_equal(got[g], tables[g], f"{name} group {g}")
    for g in range(G):
        np.testing.assert_array_equal(np.asarray(state_of["shard_map"][g]), tables[g])
        put = np.concatenate([np.asarray(bufs[g]) for bufs in state_of["put"]])
        np.testing.assert_array_equal(put, tables[g])
    print(f"\n(b) device update of each frame, {DEVICES} devices, p50 us "
          f"(cpu: calling thread; process: every thread, until the buffers are ready)")  # fmt: skip
    print(f"{'option':<34}{'cpu':>8}{'wall':>8}{'process':>9}")
    for name, t in times.items():
        c, w, p = (float(np.median([x[i] for x in t])) / 1e3 for i in range(3))
        print(f"{name:<34}{c:>8.1f}{w:>8.1f}{p:>9.1f}")
    del sp


# -- main --------------------------------------------------------------------------------


def variants(args) -> None:
    """(c) the device options under JAX/XLA settings that apply per process: each setting
    in a subprocess of its own, the settings taking turns for ``--rounds`` rounds."""
    settings = {
        "default": {},
        "async dispatch off": {"BENCH_FRAME_SYNC": "1"},
        "XLA_FLAGS=--xla_cpu_use_thunk_runtime=false": {
            "XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"
        },
        "XLA_FLAGS=--xla_cpu_multi_thread_eigen=false": {
            "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"
        },
    }
    for r in range(args.rounds):
        for name, env in settings.items():
            cmd = [sys.executable, __file__, "--frames", str(args.frames), "--only-device",
                   "--gap-ms", str(args.gap_ms)]  # fmt: skip
            out = subprocess.run(
                cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True
            ).stdout
            skip = ("", "(b)", "option ", "bench_frame", "frames p50", "the machine")
            lines = [ln for ln in out.splitlines() if ln and not ln.startswith(skip)]
            print(f"round {r + 1}, {name}:")
            for ln in lines:
                print("   ", ln)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="HEAD", help="the older commit (any git revision)")
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--gap-ms", type=float, default=1.5, help="pause before each frame")
    parser.add_argument("--shard", type=int, default=0, help="whose frames of the 4 shards")
    parser.add_argument("--skip", type=int, default=20, help="frames not counted (warm-up)")
    parser.add_argument("--device-options", action="store_true", help="also run (b)")
    parser.add_argument("--only-device", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variants", action="store_true", help="(c): flags per process")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 60 frames")
    parser.add_argument("--json", help="write the figures of (a) here")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.skip = 60, 10
    gap_s = args.gap_ms / 1e3
    if os.environ.get("BENCH_FRAME_SYNC"):
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    if args.variants:
        variants(args)
        return
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.base], cwd=HERE, check=True, capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    import sharded_pagetable as head

    widths = tuple(head.cdiv(bench_sharded.MAX_LEN, s) for s in bench_sharded.PAGE_SIZES)
    with tempfile.TemporaryDirectory(prefix="bench-frame-") as tmp:
        bench_ab.export_base(rev, Path(tmp))
        sys.path.insert(0, tmp)
        base = importlib.import_module("spt_base")
        batches = capture_batches(base, args.frames, args.shard, seed=0)
        head_wire = importlib.import_module("sharded_pagetable.shard.wire")
        head_frames = [head_wire.encode(as_shard_zero(head, b)) for b in batches]
        if args.only_device:
            device_options(head_frames, widths, gap_s, args.skip)
            return
        base_wire = importlib.import_module("spt_base.shard.wire")
        base_frames = [base_wire.encode(as_shard_zero(base, b)) for b in batches]
        names = [f"base {rev}", "this checkout"]
        subjects = [
            Subject(names[0], base, "spt_base_ray", "actor"),
            Subject(names[1], head, "ray_actors", "frames"),
        ]
        generation = batches[0].generation
        for s in subjects:
            s.shard.fence(generation)
        streams = {names[0]: base_frames, names[1]: head_frames}
        sizes = [len(f) for f in head_frames[1:]]
        rows = [b.rows for b in batches[1:]]
        cells = [sum(g.pages.size for g in b.groups) for b in batches[1:]]
        print(f"bench_frame: base {rev} vs this checkout; shard {args.shard} of {SHARDS} "
              f"x {DEVICES} devices, {args.frames} frames (first {args.skip} not counted), "
              f"{args.gap_ms} ms pause before each")  # fmt: skip
        print(f"frames p50: {np.median(sizes):.0f} B, {np.median(rows):.0f} row updates, "
              f"{np.median(cells):.0f} page ids; load average "
              f"{os.getloadavg()[0]:.2f}\n")  # fmt: skip
        res = run_frames(subjects, streams, gap_s, args.skip)
        check_same(subjects)
        for s in subjects:
            s.close()
        print("(a) one shard frame, serving thread")
        figures = report(res, names)
        if args.json:
            meta = {"base": rev, "frames": args.frames, "gap_ms": args.gap_ms,
                    "frame_bytes_p50": float(np.median(sizes))}  # fmt: skip
            Path(args.json).write_text(json.dumps({"meta": meta, **figures}, indent=1))
        if args.device_options:
            device_options(head_frames, widths, gap_s, args.skip)
        print("\nthe machine is shared and noisy: compare the two columns of one run")


if __name__ == "__main__":
    main()
