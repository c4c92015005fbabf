"""The commit channel (ray_actors.channel) over real sockets on 127.0.0.1: mutual
challenge-response, per-frame MACs with implicit sequence numbers, deadlines, and peers that
stall. Most tests drive ShardServer/ShardClient directly; one runs a real Ray table."""

import contextlib
import socket
import threading
import time

import numpy as np
import pytest

import sharded_pagetable as sp
from ray_actors.channel import ChannelClosedError, ShardClient, ShardServer, new_secret

TIMEOUT_S = 5.0


class Recorder:
    """A trivial handler: keeps every request it was called with, answers ``ack:`` + it."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[bytes] = []
        self._lock = threading.Lock()
        self._delay_s = delay_s

    def __call__(self, request: bytes) -> bytes:
        with self._lock:
            self.calls.append(request)
        time.sleep(self._delay_s)
        return b"ack:" + request


def make_server(secret: bytes, handler, **kwargs) -> ShardServer:
    return ShardServer("127.0.0.1", secret, handler, 4096, **kwargs)


@pytest.fixture
def secret() -> bytes:
    return new_secret()


@pytest.fixture
def served(secret):
    """(server, handler) with a short handshake deadline; closed after the test."""
    handler = Recorder()
    server = make_server(secret, handler, handshake_timeout_s=2.0, frame_timeout_s=0.5)
    yield server, handler
    server.close()


class Proxy:
    """A TCP proxy on 127.0.0.1 for one connection. It records both directions as they
    arrive and forwards ``edit_*(offset, chunk, seen)``: by default the chunk unchanged
    (``offset`` is the chunk's position in its stream, ``seen`` the stream so far)."""

    def __init__(self, upstream, edit_c2s=None, edit_s2c=None) -> None:
        self.c2s = bytearray()
        self.s2c = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TIMEOUT_S)
        self.address = self._listener.getsockname()[:2]
        self._thread = threading.Thread(
            target=self._run, args=(upstream, edit_c2s, edit_s2c), daemon=True
        )
        self._thread.start()

    def _run(self, upstream, edit_c2s, edit_s2c) -> None:
        try:
            down, _ = self._listener.accept()
        except OSError:
            return
        finally:
            self._listener.close()
        up = socket.create_connection(upstream, timeout=TIMEOUT_S)
        for s in (down, up):
            s.settimeout(30)  # every pump ends by itself
        pumps = [
            threading.Thread(target=self._pump, args=(down, up, self.c2s, edit_c2s), daemon=True),
            threading.Thread(target=self._pump, args=(up, down, self.s2c, edit_s2c), daemon=True),
        ]
        for p in pumps:
            p.start()
        for p in pumps:
            p.join(35)
        down.close()
        up.close()

    @staticmethod
    def _pump(src, dst, seen: bytearray, edit) -> None:
        try:
            while chunk := src.recv(65536):
                offset = len(seen)
                seen += chunk
                out = chunk if edit is None else edit(offset, chunk, seen)
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def flip(pos: int):
    """An edit that flips every bit of the stream's byte at ``pos``."""

    def edit(offset, chunk, seen):
        if offset <= pos < offset + len(chunk):
            b = bytearray(chunk)
            b[pos - offset] ^= 0xFF
            return bytes(b)
        return chunk

    return edit


def cut(lo: int, hi: float = float("inf")):
    """An edit that drops the stream's bytes ``[lo, hi)``."""

    def edit(offset, chunk, seen):
        return bytes(c for i, c in enumerate(chunk, offset) if not lo <= i < hi)

    return edit


def repeat(lo: int, hi: int):
    """An edit that sends the stream's bytes ``[lo, hi)`` a second time right after them."""
    done = []

    def edit(offset, chunk, seen):
        if not done and len(seen) >= hi:
            done.append(True)
            return chunk + bytes(seen[lo:hi])
        return chunk

    return edit


def bounce(lo: int, hi: int, other, other_lo: int, other_hi: int):
    """An edit that holds back the stream's bytes ``[lo, hi)`` and sends in their place the
    bytes ``[other_lo, other_hi)`` of the opposite direction (``other()`` returns the proxy's
    record of it; the edit waits for them if they have not passed yet): a frame bounced
    back at the side that sent it."""
    done = []

    def edit(offset, chunk, seen):
        before = bytes(c for i, c in enumerate(chunk, offset) if i < lo)
        after = bytes(c for i, c in enumerate(chunk, offset) if i >= hi)
        if done or len(seen) < hi:
            return before + after
        done.append(True)
        deadline = time.monotonic() + TIMEOUT_S
        while len(other()) < other_hi and time.monotonic() < deadline:
            time.sleep(0.005)
        return before + bytes(other()[other_lo:other_hi]) + after

    return edit


def shape(server, secret) -> tuple[int, int]:
    """Measured on a recorded session: bytes a client sends to authenticate, and the bytes
    a frame adds to its payload."""
    proxy = Proxy(server.address)
    client = ShardClient(proxy.address, secret, TIMEOUT_S)
    handshake = len(proxy.c2s)
    client.send(b"abc")
    assert client.recv(time.monotonic() + TIMEOUT_S) == b"ack:abc"
    overhead = len(proxy.c2s) - handshake - 3
    client.close()
    return handshake, overhead


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as
    closed; a timeout fails the test)."""
    sock.settimeout(timeout_s)
    got = bytearray()
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return bytes(got)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(TIMEOUT_S)
    got = bytearray()
    while len(got) < n and (chunk := sock.recv(n - len(got))):
        got += chunk
    return bytes(got)


def closed_at(sock: socket.socket, out: dict) -> threading.Thread:
    """A thread that waits for the server to hang up on ``sock`` and notes when."""

    def wait() -> None:
        out["data"] = read_until_closed(sock, 30)
        out["at"] = time.monotonic()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def round_trip(client: ShardClient, payload: bytes, within_s: float = 1.0) -> float:
    t0 = time.monotonic()
    client.send(payload)
    assert client.recv(t0 + within_s) == b"ack:" + payload
    return time.monotonic() - t0


def test_round_trips_in_order(served, secret):
    server, handler = served
    client = ShardClient(server.address, secret, TIMEOUT_S)
    payloads = [bytes([i]) * (i * 97) for i in range(20)]
    for p in payloads:
        round_trip(client, p)
    assert handler.calls == payloads
    client.close()


def test_recorded_handshake_replayed_is_refused(served, secret):
    server, handler = served
    proxy = Proxy(server.address)
    client = ShardClient(proxy.address, secret, TIMEOUT_S)
    for i in range(3):
        round_trip(client, b"epoch %d" % i)
    client.close()
    recorded = bytes(proxy.c2s)
    calls = list(handler.calls)
    with socket.create_connection(server.address, timeout=TIMEOUT_S) as replay:
        replay.sendall(recorded[:36])  # the recorded hello
        challenge = read_exactly(replay, 68)
        replay.sendall(recorded[36:])  # the recorded proof, then the recorded frames
        after = read_until_closed(replay, TIMEOUT_S)
    # The challenge is fresh, so the recorded proof answers another question: the server
    # hangs up without its welcome frame, and the handler never sees the recorded frames.
    assert len(challenge) == 68 and challenge[4:36] != bytes(proxy.s2c[4:36])
    assert after == b""
    assert handler.calls == calls


@pytest.mark.parametrize("where", ["header", "payload", "tag"])
def test_flipped_byte_of_a_frame_closes_and_changes_nothing(served, secret, where):
    server, handler = served
    handshake, _ = shape(server, secret)
    calls = list(handler.calls)
    payload = b"x" * 100
    pos = handshake + {"header": 0, "payload": 4 + 50, "tag": 4 + len(payload) + 3}[where]
    proxy = Proxy(server.address, edit_c2s=flip(pos))
    client = ShardClient(proxy.address, secret, TIMEOUT_S)
    client.send(payload)
    with pytest.raises(ChannelClosedError):
        client.recv(time.monotonic() + TIMEOUT_S)
    assert client.broken
    assert handler.calls == calls


def test_flipped_byte_of_a_reply_is_refused_by_the_client(served, secret):
    server, _ = served
    # The server sends its challenge, then the "ok" frame, then the reply frame.
    _, overhead = shape(server, secret)
    challenge = 4 + 32 + 32
    reply_at = challenge + overhead + 2
    proxy = Proxy(server.address, edit_s2c=flip(reply_at + 4 + 1))
    client = ShardClient(proxy.address, secret, TIMEOUT_S)
    client.send(b"hello")
    with pytest.raises(ChannelClosedError, match="MAC"):
        client.recv(time.monotonic() + TIMEOUT_S)


def test_flipped_handshake_byte_is_refused(served, secret):
    server, handler = served
    handshake, _ = shape(server, secret)
    for edits in ({"edit_c2s": flip(handshake - 1)}, {"edit_s2c": flip(40)}):
        proxy = Proxy(server.address, **edits)
        with pytest.raises(ChannelClosedError):
            ShardClient(proxy.address, secret, TIMEOUT_S)
    assert len(handler.calls) == 1  # the one frame of shape()


def test_replayed_and_dropped_frames_fail_their_sequence_number(served, secret):
    server, handler = served
    handshake, overhead = shape(server, secret)
    calls = list(handler.calls)
    first = handshake, handshake + overhead + 3
    # A frame sent twice on the same connection: the copy carries the wrong sequence number.
    proxy = Proxy(server.address, edit_c2s=repeat(*first))
    client = ShardClient(proxy.address, secret, TIMEOUT_S)
    round_trip(client, b"one")
    with pytest.raises((ChannelClosedError, ConnectionError)):
        client.send(b"two")
        client.recv(time.monotonic() + TIMEOUT_S)
    assert handler.calls == [*calls, b"one"]
    # A frame dropped: the next one arrives with the sequence number of the dropped one + 1.
    proxy = Proxy(server.address, edit_c2s=cut(*first))
    client = ShardClient(proxy.address, secret, TIMEOUT_S)
    client.send(b"one")
    client.send(b"two")
    with pytest.raises(ChannelClosedError):
        client.recv(time.monotonic() + TIMEOUT_S)
    assert handler.calls == [*calls, b"one"]


def test_server_frame_reflected_to_the_server_fails_its_mac(served, secret):
    server, handler = served
    handshake, overhead = shape(server, secret)
    calls = list(handler.calls)
    # Server to client: challenge, "ok" (frame 0), "ack:one" (frame 1). Client to server:
    # handshake, "one" (frame 0), "two" (frame 1). The proxy sends the server's frame 1 back
    # to it in place of the client's frame 1: the same key and sequence number, so only the
    # direction in its MAC tells it from a request.
    reply_at = 4 + 32 + 32 + overhead + 2
    reply = reply_at, reply_at + overhead + len(b"ack:one")
    two_at = handshake + overhead + 3
    proxy = Proxy(
        server.address,
        edit_c2s=bounce(two_at, two_at + overhead + 3, lambda: proxy.s2c, *reply),
    )
    client = ShardClient(proxy.address, secret, TIMEOUT_S)
    round_trip(client, b"one")
    assert bytes(proxy.s2c[reply[0] + 4 : reply[1] - 32]) == b"ack:one"  # the bounced frame
    client.send(b"two")
    with pytest.raises(ConnectionError):  # the server hung up: no reply to "ack:one"
        client.recv(time.monotonic() + TIMEOUT_S)
    assert handler.calls == [*calls, b"one"]


def test_client_frame_reflected_to_the_client_fails_its_mac(served, secret):
    server, handler = served
    handshake, overhead = shape(server, secret)
    calls = list(handler.calls)
    # The client's frame 1 ("two") never reaches the server; the proxy sends it back in
    # place of the server's frame 1 (the reply to "one"), which the client expects next.
    two_at = handshake + overhead + 3
    two = two_at, two_at + overhead + 3
    reply_at = 4 + 32 + 32 + overhead + 2
    proxy = Proxy(
        server.address,
        edit_c2s=cut(*two),
        edit_s2c=bounce(reply_at, reply_at + overhead + 7, lambda: proxy.c2s, *two),
    )
    client = ShardClient(proxy.address, secret, TIMEOUT_S)
    client.send(b"one")
    client.send(b"two")
    with pytest.raises(ChannelClosedError, match="MAC"):
        client.recv(time.monotonic() + TIMEOUT_S)
    assert client.broken
    assert bytes(proxy.c2s[two[0] + 4 : two[1] - 32]) == b"two"  # the bounced frame
    assert handler.calls == [*calls, b"one"]


def test_wrong_secret_is_refused(served, secret):
    server, handler = served
    with pytest.raises(ChannelClosedError, match="did not prove"):
        ShardClient(server.address, new_secret(), TIMEOUT_S)
    # A peer that answers the challenge without the secret gets no welcome.
    with socket.create_connection(server.address, timeout=TIMEOUT_S) as peer:
        peer.sendall(b"SPT1" + bytes(32))
        challenge = read_exactly(peer, 68)
        peer.sendall(bytes(32))
        assert len(challenge) == 68 and read_until_closed(peer, TIMEOUT_S) == b""
    # Nor does one that does not speak the protocol, or sends the secret itself.
    for opening in (b"GET / HTTP/1.1\r\n\r\n" + bytes(40), secret + bytes(40)):
        with socket.create_connection(server.address, timeout=TIMEOUT_S) as peer:
            peer.sendall(opening)
            read_until_closed(peer, TIMEOUT_S)
    assert handler.calls == []


def test_secret_never_crosses_the_wire(served, secret):
    server, _ = served
    sessions = []
    for _ in range(2):
        proxy = Proxy(server.address)
        client = ShardClient(proxy.address, secret, TIMEOUT_S)
        for i in range(5):
            round_trip(client, b"step %d" % i)
        client.close()
        sessions.append(proxy)
    for proxy in sessions:
        assert secret not in proxy.c2s and secret not in proxy.s2c
    # Fresh nonces on both sides: no two connections start the same way.
    assert sessions[0].c2s[:36] != sessions[1].c2s[:36]
    assert sessions[0].s2c[:68] != sessions[1].s2c[:68]


def drip(address, every_s: float, out: dict) -> None:
    """A peer that sends one byte every ``every_s`` until the server hangs up."""
    t0 = time.monotonic()
    with socket.create_connection(address, timeout=TIMEOUT_S) as s:
        try:
            for _ in range(200):
                s.sendall(b"S")
                s.settimeout(every_s)
                try:
                    if s.recv(4096) == b"":
                        break
                except TimeoutError:
                    pass
        except OSError:
            pass
    out["held_s"] = time.monotonic() - t0


def test_stalled_and_dripping_peers_do_not_block_the_coordinator(served, secret):
    server, handler = served  # handshake_timeout_s=2.0
    t0 = time.monotonic()
    stalled = socket.create_connection(server.address, timeout=TIMEOUT_S)
    hung_up: dict = {}
    watcher = closed_at(stalled, hung_up)
    dripped: dict = {}
    dripper = threading.Thread(target=drip, args=(server.address, 0.5, dripped), daemon=True)
    dripper.start()
    time.sleep(0.3)
    client = ShardClient(server.address, secret, 1.0)
    times = []
    for i in range(20):
        times.append(round_trip(client, b"step %d" % i, within_s=1.0))
        time.sleep(0.1)  # the peers keep at it for the whole run
    assert max(times) < 1.0 and len(handler.calls) == 20
    # The deadline is on the whole handshake, not on each read.
    watcher.join(TIMEOUT_S)
    assert hung_up["data"] == b"" and hung_up["at"] - t0 < 2.0 + 1.0
    dripper.join(TIMEOUT_S)
    assert not dripper.is_alive() and dripped["held_s"] < 2.0 + 1.0
    stalled.close()
    client.close()


def test_more_stalled_peers_than_slots_evict_the_oldest(secret):
    handler = Recorder()
    server = make_server(secret, handler, handshake_timeout_s=30.0, max_pending=4)
    try:
        peers = [socket.create_connection(server.address, timeout=TIMEOUT_S) for _ in range(10)]
        t0 = time.monotonic()
        client = ShardClient(server.address, secret, 1.0)
        for i in range(20):
            round_trip(client, b"%d" % i)
        assert time.monotonic() - t0 < 2.0
        # The oldest stalled peers lost their slots long before their deadline.
        assert read_until_closed(peers[0], TIMEOUT_S) == b""
        for p in peers:
            p.close()
        client.close()
    finally:
        server.close()


def test_idle_session_stays_but_a_started_frame_must_finish(served, secret):
    server, handler = served  # frame_timeout_s=0.5
    handshake, overhead = shape(server, secret)
    calls = list(handler.calls)
    second = handshake + overhead + 3
    proxy = Proxy(server.address, edit_c2s=cut(second + 3))  # 3 bytes of frame 2, then nothing
    client = ShardClient(proxy.address, secret, TIMEOUT_S)
    time.sleep(1.0)  # idle for longer than a frame may take
    round_trip(client, b"one")
    t0 = time.monotonic()
    client.send(b"two")
    with pytest.raises(ChannelClosedError):
        client.recv(t0 + TIMEOUT_S)
    assert 0.4 < time.monotonic() - t0 < 2.0
    assert handler.calls == [*calls, b"one"]


def test_client_reads_against_its_deadline(secret):
    handler = Recorder(delay_s=1.5)
    server = make_server(secret, handler)
    try:
        client = ShardClient(server.address, secret, TIMEOUT_S)
        t0 = time.monotonic()
        client.send(b"slow")
        with pytest.raises(TimeoutError):
            client.recv(t0 + 0.3)
        assert time.monotonic() - t0 < 1.0 and client.broken
        client.close()
    finally:
        server.close()


def test_close_hangs_up_authenticated_sessions(secret):
    handler = Recorder()
    server = make_server(secret, handler)
    client = ShardClient(server.address, secret, TIMEOUT_S)
    round_trip(client, b"one")
    server.close()
    with pytest.raises(ChannelClosedError):
        client.recv(time.monotonic() + TIMEOUT_S)
    with pytest.raises(OSError):
        ShardClient(server.address, secret, 1.0)


@pytest.mark.ray
@pytest.mark.multiprocess
def test_ray_table_commits_past_stalled_peers(local_ray):
    ray = pytest.importorskip("ray")
    t = sp.ShardedPageTable(
        64,
        512,
        256,
        [16],
        num_shards=2,
        backend="ray",
        ray={"devices_per_shard": 1, "timeout_s": 30},
    )
    peers: list[socket.socket] = []
    try:
        placements = t._backend.placements
        keys = ray.get([a.channel_secret.remote() for a in t._backend.actors], timeout=30)
        assert len({k.table_id for k in keys}) == 1
        assert len({k.secret for k in keys}) == 2, "each shard has its own secret"
        addresses = [tuple(p["channel"]) for p in placements]
        assert all(host == "127.0.0.1" for host, _ in addresses)
        with pytest.raises(ChannelClosedError):  # shard 1's secret does not open shard 0
            ShardClient(addresses[0], keys[1].secret, 5.0)
        t.append_row([[1]], 0)
        t.commit(64)  # the first commit pays for compiling; the peers come after it
        peers = [socket.create_connection(a, timeout=TIMEOUT_S) for a in addresses]
        dripped: dict = {}
        dripper = threading.Thread(target=drip, args=(addresses[1], 0.5, dripped), daemon=True)
        dripper.start()
        times, first = [], t.epoch
        for step in range(20):
            t.append_row([[100 + step]], (step * 7) % 64)
            t0 = time.monotonic()
            receipt = t.commit(64)
            times.append(time.monotonic() - t0)
            assert receipt.epoch == first + step + 1 and receipt.changed
            time.sleep(0.05)
        assert max(times) < 1.0, times
        np.testing.assert_array_equal(t.device_snapshot(0), t[0].get_cpu_tensor())
        dripper.join(15)
        assert not dripper.is_alive() and dripped["held_s"] < 5.0 + 3.0
    finally:
        for p in peers:
            p.close()
        t.close()
