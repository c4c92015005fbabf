"""Connection flood against one shard channel: what a new coordinator and an open channel see.

    scripts/dev.sh bench channel_flood                   # 2 flooders, connect+close, 10 s
    scripts/dev.sh bench channel_flood --mode hold       # flooders keep their sockets open
    scripts/dev.sh bench channel_flood --flooders 0      # baseline, no flood
    scripts/dev.sh bench channel_flood --backlog 64      # override the listen backlog (A/B)

One process runs a ShardServer (echo handler, real secret) on 127.0.0.1; ``--flooders``
processes open TCP connections to it as fast as they can (non-blocking, ``--window`` connects
in flight each) for ``--seconds``; meanwhile one process starts a new ShardClient (connect +
handshake + one round trip) every ``--probe-every`` s with a 5 s timeout, and another does a
round trip on a channel opened before the flood every 10 ms. Everything is on 127.0.0.1,
bounded in time and count, and every child is joined, then terminated, at the end.

Prints the server's accept rate, the flood's connect rate, each probe's outcome, the open
channel's round-trip p50/p99/max, the listener's accept queue, and the kernel's
ListenOverflows / ListenDrops / SYN-cookie counters over the run (namespace-wide).
"""

from __future__ import annotations

import argparse
import collections
import errno
import itertools
import multiprocessing as mp
import os
import random
import selectors
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ray_actors.channel import ShardClient, ShardServer, new_secret

HOST = "127.0.0.1"
CLIENT_TIMEOUT_S = 5.0
RT_EVERY_S = 0.01
HOLD_MAX = 4000  # sockets a flooder holds in --mode hold (fd limit 20000 here)
KERNEL_COUNTERS = (
    "ListenOverflows",
    "ListenDrops",
    "SyncookiesSent",
    "SyncookiesRecv",
    "TCPReqQFullDrop",
    "TCPReqQFullDoCookies",
)


def serve(secret, backlog, address_q, stop, out_q) -> None:
    """The shard's end; reports connections accepted, sampled every 0.25 s."""
    if backlog is not None:  # this process only: what ShardServer asks for is overridden
        create = socket.create_server
        socket.create_server = lambda addr, **kw: create(addr, **{**kw, "backlog": backlog})
    server = ShardServer(HOST, secret, lambda request: request, 4096)
    address_q.put(server.address)
    samples = []  # (monotonic, connections accepted so far, threads)
    while not stop.wait(0.25):
        samples.append((time.monotonic(), server.accepted, threading.active_count()))
    server.close()
    out_q.put(("server", samples))


def flood(address, mode, window, give_up_s, start, until, out_q) -> None:
    """Connects with ``window`` non-blocking connects in flight; closes each at once or holds
    up to HOLD_MAX. A connect not done within ~``give_up_s`` (jittered, so they do not all
    go at once) is dropped for a new one: a dropped SYN is retransmitted only after 1 s, and
    waiting for it would slow the flood down to what the server accepts."""
    time.sleep(max(0.0, start - time.monotonic()))
    sel = selectors.DefaultSelector()
    held: collections.deque[socket.socket] = collections.deque()
    done, timeouts, errors = 0, 0, collections.Counter()
    while (now := time.monotonic()) < until:
        while len(sel.get_map()) < window:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex(address)
            if err not in (0, errno.EINPROGRESS):
                errors[errno.errorcode.get(err, str(err))] += 1
                s.close()
                break
            sel.register(s, selectors.EVENT_WRITE, now + give_up_s * random.uniform(0.5, 1.5))
        for key, _ in sel.select(0.05):
            s = key.fileobj
            sel.unregister(s)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                errors[errno.errorcode.get(err, str(err))] += 1
                s.close()
            elif mode == "close":
                done += 1
                s.close()
            else:
                done += 1
                held.append(s)
                if len(held) > HOLD_MAX:
                    held.popleft().close()
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            if now > key.data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                timeouts += 1
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    for s in held:
        s.close()
    out_q.put(("flood", {"connected": done, "timeouts": timeouts, "errors": dict(errors)}))


def probe(address, secret, every_s, start, until, out_q) -> None:
    """A new coordinator every ``every_s``: connect, handshake, one round trip, close."""
    results, lock = [], threading.Lock()

    def one(at: float) -> None:
        t0 = time.monotonic()
        try:
            client = ShardClient(address, secret, CLIENT_TIMEOUT_S)
            try:
                client.send(b"probe")
                assert client.recv(time.monotonic() + CLIENT_TIMEOUT_S) == b"probe"
            finally:
                client.close()
            outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
        except OSError as exc:
            outcome = type(exc).__name__
        with lock:
            results.append((at, outcome, time.monotonic() - t0))

    threads = []
    for i in itertools.count():
        at = start + i * every_s
        if at >= until:
            break
        time.sleep(max(0.0, at - time.monotonic()))
        threads.append(threading.Thread(target=one, args=(at - start,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(2 * CLIENT_TIMEOUT_S + 1)
    out_q.put(("probe", sorted(results)))


def round_trips(address, secret, ready, start, until, out_q) -> None:
    """The coordinator's open channel: one round trip every RT_EVERY_S during the run."""
    client = ShardClient(address, secret, CLIENT_TIMEOUT_S)
    ready.set()
    times, errors = [], collections.Counter()
    time.sleep(max(0.0, start - time.monotonic()))
    while time.monotonic() < until:
        t0 = time.monotonic()
        try:
            client.send(b"x" * 512)
            client.recv(t0 + CLIENT_TIMEOUT_S)
            times.append(time.monotonic() - t0)
        except OSError as exc:
            errors[type(exc).__name__] += 1
            client.close()
            client = ShardClient(address, secret, CLIENT_TIMEOUT_S)
        time.sleep(RT_EVERY_S)
    client.close()
    out_q.put(("rt", {"times": times, "errors": dict(errors)}))


def kernel_counters() -> dict[str, int]:
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in itertools.pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
            return {k: row.get(k, 0) for k in KERNEL_COUNTERS}
    return {}


def listen_queue(port: int) -> tuple[int, int] | None:
    """(connections waiting in the accept queue, backlog) of the listener, from ss."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=5
    ).stdout.split()
    return (int(out[1]), int(out[2])) if len(out) >= 3 else None


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flooders", type=int, default=2)
    parser.add_argument("--mode", choices=["close", "hold"], default="close")
    parser.add_argument("--window", type=int, default=256, help="connects in flight per flooder")
    parser.add_argument("--give-up", type=float, default=0.02, help="s before a connect is dropped")
    parser.add_argument("--probe-every", type=float, default=0.5)
    parser.add_argument("--backlog", type=int, default=None, help="default: what ShardServer asks")
    args = parser.parse_args()
    if not 0 < args.seconds <= 30 or not 0 <= args.flooders <= 4 or not 1 <= args.window <= 1024:
        parser.error("keep it bounded: --seconds in (0, 30], --flooders <= 4, --window <= 1024")

    ctx = mp.get_context("fork")  # children inherit the imports (jax takes ~1.5 s)
    secret = new_secret()
    out_q, address_q = ctx.Queue(), ctx.Queue()
    stop, ready = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=serve, args=(secret, args.backlog, address_q, stop, out_q))]
    procs[0].start()
    results: dict[str, list] = collections.defaultdict(list)
    try:
        address = address_q.get(timeout=30)
        start = time.monotonic() + 1.0
        until = start + args.seconds
        workers = [
            ctx.Process(target=round_trips, args=(address, secret, ready, start, until, out_q)),
            ctx.Process(
                target=probe, args=(address, secret, args.probe_every, start, until, out_q)
            ),
        ] + [
            ctx.Process(
                target=flood,
                args=(address, args.mode, args.window, args.give_up, start, until, out_q),
            )
            for _ in range(args.flooders)
        ]
        for p in workers:
            p.start()
        procs += workers
        if not ready.wait(10):
            raise RuntimeError("the open channel did not connect before the flood")
        before = kernel_counters()
        queue = []  # (s since start, accept queue length)
        backlog = None
        while (now := time.monotonic()) < until + 0.5:
            if now >= start and (q := listen_queue(address[1])) is not None:
                queue.append((now - start, q[0]))
                backlog = q[1]
            time.sleep(0.5)
        after = kernel_counters()
        for _ in range(len(workers)):
            kind, value = out_q.get(timeout=2 * CLIENT_TIMEOUT_S + 5)
            results[kind].append(value)
        stop.set()
        kind, value = out_q.get(timeout=10)
        results[kind].append(value)
    finally:
        stop.set()
        for p in procs:
            p.join(5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join()

    samples = results["server"][0]
    in_run = [(t, n) for t, n, _ in samples if start <= t <= until]
    accepted = in_run[-1][1] - in_run[0][1] if len(in_run) > 1 else 0
    span = in_run[-1][0] - in_run[0][0] if len(in_run) > 1 else 1.0
    floods = results["flood"]
    flooded = sum(f["connected"] for f in floods)
    attempted = flooded + sum(f["timeouts"] + sum(f["errors"].values()) for f in floods)
    flood_errors = collections.Counter()
    for f in floods:
        flood_errors.update(f["errors"])
        flood_errors["given up"] += f["timeouts"]
    probes = results["probe"][0]
    ok = [lat for _, outcome, lat in probes if outcome == "ok"]
    rt = results["rt"][0]
    ms = [t * 1e3 for t in rt["times"]]
    print(
        f"backlog {backlog} | {args.flooders} flooders, mode {args.mode}, window {args.window},"
        f" {args.seconds:.0f} s"
    )
    print(
        f"server accepted     {accepted / span:8.0f} /s  (threads max {max(s[2] for s in samples)})"
    )
    print(
        f"flood connected     {flooded / args.seconds:8.0f} /s  of {attempted / args.seconds:.0f}"
        f" attempted /s  errors {dict(flood_errors) or '-'}"
    )
    print(
        f"accept queue        max {max((q for _, q in queue), default=0)}"
        f"  samples {[q for _, q in queue]}"
    )
    print(
        "new client          "
        f"ok {len(ok)}/{len(probes)}  p50 {pct(ok, 0.5) * 1e3:.1f} ms  max "
        f"{max(ok, default=float('nan')) * 1e3:.0f} ms  "
        f"failed {collections.Counter(o for _, o, _ in probes if o != 'ok') or '-'}"
    )
    print(
        "  probes (s: outcome latency)  "
        + "  ".join(
            f"{at:.1f}:{'' if o == 'ok' else o + ' '}{lat * 1e3:.0f}ms" for at, o, lat in probes
        )
    )
    print(
        f"open channel        n {len(ms)}  p50 {pct(ms, 0.5):.2f} ms  p99 {pct(ms, 0.99):.2f} ms"
        f"  max {max(ms, default=float('nan')):.1f} ms  errors {rt['errors'] or '-'}"
    )
    print(f"kernel (delta)      { ({k: after[k] - before[k] for k in after}) }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
