"""The commit data plane: one authenticated TCP stream per shard, length-prefixed frames.

Ray starts, places and supervises the shard actors, but an ordinary Ray actor call costs
about 2-3 ms fanned out to four actors on a 2-core machine, and Ray's compiled graphs keep
every actor polling its channel. Per-step traffic therefore goes over a plain socket per
shard (the way vLLM broadcasts scheduler output over its own message queue): the driver
writes one frame per shard and reads one ack frame back, and an idle shard sleeps in
``recv``.

Protocol (``S`` is the shard's own 32-byte secret, handed out through Ray's authenticated
control plane; ``|`` is concatenation)::

    client -> server  MAGIC | cn                          cn, sn: 32 fresh random bytes
    server -> client  MAGIC | sn | HMAC(S, "spt-server" | cn | sn)
    client -> server  HMAC(S, "spt-client" | cn | sn)
    key = HMAC(S, "spt-key" | cn | sn)                    per connection, never sent
    then frames both ways: u32 length | payload | HMAC(key, dir | u64 seq | payload)

The first frame is the server's ``b"ok"``. ``dir`` tells the two directions apart and
``seq`` counts the frames of each direction, implicitly, so a replayed, reordered,
reflected or dropped frame fails its MAC. The secret never crosses the wire, and a
recorded handshake cannot be replayed because the other side's nonce is new each time.
A bad proof or MAC, an over-long frame, or a deadline missed closes the connection before
the handler sees anything.

Why not ``multiprocessing.connection``'s authkey handshake (``deliver_challenge`` /
``answer_challenge``): on Python 3.11 it is HMAC-MD5, it yields no per-connection key (its
nonces stay inside it, so a key would need a second exchange anyway), its frames carry no
MAC, and it reads the raw descriptor, so an overall deadline cannot be put on it. The
challenge-response above is the same idea in a dozen lines over the libraries that do the
cryptography: :mod:`hmac` (``compare_digest``; OpenSSL's HMAC underneath), :mod:`hashlib`
and :mod:`secrets`. TLS (:mod:`ssl` with a pre-shared key) would add confidentiality, but
needs certificates or PSK callbacks on every node for data that is not secret.

Deadlines: a handshake must finish within ``handshake_timeout_s`` in total (not per read),
and at most ``max_pending`` handshakes run at once; a new connection evicts the oldest
pending one, so stalled peers neither block the coordinator nor keep a slot from it. An
authenticated connection may idle between frames, but a frame once started must arrive
within ``frame_timeout_s``. The client reads each reply against the caller's deadline.

What it does not do: encrypt (a peer on the path reads page ids; add TLS for that), or
hide how many frames of what size flow. Frames are bounded in size; what they carry is
:mod:`sharded_pagetable.shard.wire`'s business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sharded_pagetable.errors import WireFormatError

log = logging.getLogger(__name__)

SECRET_BYTES = 32
NONCE_BYTES = 32
TAG_BYTES = 32  # full HMAC-SHA256; truncating would save nothing measurable
MAGIC = b"SPT1"
_HEADER = struct.Struct("<I")
_CHUNK = 1 << 16  # a read asks for at least this much: a whole frame comes in one recv
_SEQ = struct.Struct("<Q")
_TO_SERVER, _TO_CLIENT = b"c", b"s"
_HELLO = len(MAGIC) + NONCE_BYTES
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # 0 where the platform has no such flag
_CHALLENGE = len(MAGIC) + NONCE_BYTES + TAG_BYTES


class ChannelClosedError(ConnectionError):
    """The shard's end of the channel is gone (the shard process most likely died), or the
    peer failed to authenticate itself or a frame."""


@dataclasses.dataclass(frozen=True, repr=False)
class ChannelKey:
    """One shard's channel secret, and the id of the table the shard belongs to.

    The id is public (it only tells tables apart when a coordinator attaches); the secret
    is the shard's own, so a peer holding one shard's secret cannot talk to another shard.
    """

    table_id: str  # hex
    secret: bytes  # SECRET_BYTES random bytes

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_BYTES:
            raise ValueError(f"a channel secret must be {SECRET_BYTES} bytes")
        if not isinstance(self.table_id, str) or not self.table_id:
            raise ValueError(f"table_id must be a non-empty str, got {self.table_id!r}")

    def __repr__(self) -> str:  # never print the secret
        return f"ChannelKey(table_id={self.table_id!r})"


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def new_keys(num_shards: int, table_id: str | None = None) -> list[ChannelKey]:
    """An independent secret for each of ``num_shards`` shards, under a fresh table id (or
    ``table_id``: a shard replaced in a running table)."""
    table_id = secrets.token_hex(16) if table_id is None else table_id
    return [ChannelKey(table_id, new_secret()) for _ in range(num_shards)]


def _proof(secret: bytes, label: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.digest(secret, label + client_nonce + server_nonce, hashlib.sha256)


class _Stream:
    """One connection's socket with a read buffer, so a frame that arrived whole costs one
    ``recv``. Every read has a deadline (monotonic) or, with None, waits as long as it takes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def _wait(self, missing: int, n: int, deadline: float | None, first: bool) -> None:
        if deadline is None:
            if self.sock.gettimeout() is not None:
                self.sock.settimeout(None)
            return
        left = deadline - time.monotonic()
        if left <= 0 and not first:  # the first read may take what is there already
            raise TimeoutError(f"{missing} of {n} bytes missing at the deadline")
        self.sock.settimeout(max(left, 1e-3))

    def read(self, n: int, deadline: float | None) -> bytes | bytearray:
        buf, first = self._buf, True
        if n - len(buf) > _CHUNK:
            return self._read_large(n, deadline)
        while len(buf) < n:
            self._wait(n - len(buf), n, deadline, first)
            first = False
            chunk = self.sock.recv(_CHUNK)
            if not chunk:
                raise ChannelClosedError("connection closed by peer")
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def _read_large(self, n: int, deadline: float | None) -> bytearray:
        """``n`` bytes straight into one buffer (a KV frame of megabytes: reading it in
        chunks and joining them cost 4x the time on loopback)."""
        out = bytearray(n)
        view = memoryview(out)
        have = len(self._buf)
        view[:have] = self._buf
        self._buf.clear()
        first = True
        while have < n:
            self._wait(n - have, n, deadline, first)
            first = False
            got = self.sock.recv_into(view[have:], n - have)
            if not got:
                raise ChannelClosedError("connection closed by peer")
            have += got
        return out

    def recv_idle(self) -> bytes:
        """The next bytes to arrive, waiting as long as it takes, unbuffered (call only
        with nothing buffered: :attr:`buffered`)."""
        if self.sock.gettimeout() is not None:
            self.sock.settimeout(None)
        chunk = self.sock.recv(_CHUNK)
        if not chunk:
            raise ChannelClosedError("connection closed by peer")
        return chunk

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def unread(self, data: bytes) -> None:
        """Buffer ``data`` (bytes :meth:`recv_idle` returned) for the next reads."""
        self._buf += data

    def send(self, *parts: bytes, timeout_s: float) -> None:
        data = b"".join(parts) if sum(map(len, parts)) <= _CHUNK else None
        if data is not None and _DONTWAIT and self.sock.gettimeout() is None:
            # A blocking socket (an idle server) takes a small frame in one send that cannot
            # block: two system calls fewer than arming the timeout for sendall.
            try:
                sent = self.sock.send(data, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.sock.settimeout(timeout_s)
        if data is not None:
            self.sock.sendall(data)  # one segment for a small frame
        else:
            for part in parts:  # no copy of a large payload
                self.sock.sendall(part)


class _Framer:
    """One side of an authenticated connection: MACs and implicit sequence numbers."""

    def __init__(self, stream: _Stream, key: bytes, send_dir: bytes, recv_dir: bytes) -> None:
        self._stream = stream
        keyed = hmac.new(key, digestmod=hashlib.sha256)
        # OpenSSL's HMAC object under hmac.HMAC when there is one (CPython 3.11+ with
        # OpenSSL): the same copy/update/digest without a Python frame around each call.
        self._keyed = getattr(keyed, "_hmac", None) or keyed
        self._send_dir, self._recv_dir = send_dir, recv_dir
        self._send_seq = 0
        self._recv_seq = 0

    def _tag(self, direction: bytes, seq: int, payload: bytes) -> bytes:
        # A copy of the keyed state rather than hmac.digest, which makes OpenSSL 3 fetch
        # the digest and key the HMAC again on every call: ~2.5 vs ~3.1 us (512 B frame).
        mac = self._keyed.copy()
        mac.update(direction + _SEQ.pack(seq))
        mac.update(payload)
        return mac.digest()

    def send(self, payload: bytes, timeout_s: float) -> None:
        tag = self._tag(self._send_dir, self._send_seq, payload)
        self._send_seq += 1
        self._stream.send(_HEADER.pack(len(payload)), payload, tag, timeout_s=timeout_s)

    def recv(self, max_bytes: int, deadline: float) -> bytes:
        """The next verified payload, all of it by ``deadline`` (monotonic)."""
        return self._recv(max_bytes, self._stream.read(_HEADER.size, deadline), deadline)

    def recv_after_idle(self, max_bytes: int, frame_timeout_s: float) -> bytes:
        """The next verified payload: waits for its first byte as long as it takes, then
        wants the rest within ``frame_timeout_s``."""
        stream = self._stream
        if not stream.buffered:
            chunk = stream.recv_idle()
            # The usual case: one read brought exactly one whole frame (a commit's frame is
            # a few KiB), verified here without going through the read buffer.
            if len(chunk) >= _HEADER.size + TAG_BYTES:
                (size,) = _HEADER.unpack_from(chunk)
                if size <= max_bytes and len(chunk) == _HEADER.size + size + TAG_BYTES:
                    view = memoryview(chunk)
                    return self._verified(view[_HEADER.size : -TAG_BYTES], view[-TAG_BYTES:])
            stream.unread(chunk)
        first = stream.read(1, None)
        deadline = time.monotonic() + frame_timeout_s
        return self._recv(max_bytes, first + stream.read(_HEADER.size - 1, deadline), deadline)

    def _verified(self, payload: memoryview, tag: memoryview) -> bytes:
        if not hmac.compare_digest(tag, self._tag(self._recv_dir, self._recv_seq, payload)):
            raise WireFormatError(f"frame {self._recv_seq} failed its MAC")
        self._recv_seq += 1
        return payload.tobytes()

    def _recv(self, max_bytes: int, header: bytes, deadline: float) -> bytes:
        (size,) = _HEADER.unpack(header)
        if size > max_bytes:
            raise WireFormatError(f"frame of {size} bytes exceeds the limit {max_bytes}")
        data = self._stream.read(size + TAG_BYTES, deadline)
        view = memoryview(data)
        return self._verified(view[:size], view[size:])


class ShardServer:
    """The shard's end: accepts authenticated drivers concurrently and answers their frames.

    Each connection gets its own thread, so ``handler`` may run on several threads at
    once; the shard actor serialises it with its own lock.

    Args:
      host: address to listen on (the node's IP).
      secret: this shard's channel secret (:attr:`ChannelKey.secret`).
      handler: turns a request frame into a reply frame.
      max_bytes: largest request frame accepted.
      handshake_timeout_s: total time a peer has to authenticate.
      frame_timeout_s: time a started frame has to arrive in full.
      max_pending: connections allowed to be authenticating at once.
    """

    def __init__(
        self,
        host: str,
        secret: bytes,
        handler: Callable[[bytes], bytes],
        max_bytes: int,
        *,
        handshake_timeout_s: float = 5.0,
        frame_timeout_s: float = 10.0,
        max_pending: int = 16,
    ) -> None:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a channel secret must be {SECRET_BYTES} bytes, got {len(secret)}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._secret = secret
        self._handler = handler
        self._max_bytes = max_bytes
        self._handshake_s = handshake_timeout_s
        self._frame_s = frame_timeout_s
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: OrderedDict[socket.socket, None] = OrderedDict()  # oldest first
        self._open: set[socket.socket] = set()
        self._closed = False
        self.accepted = 0  # connections accepted so far (what a flood got through)
        # A short accept queue on purpose: under a connection flood any queue stays full, and a
        # new client waits backlog / accept rate in it. At SOMAXCONN (4096) every new client
        # took 1-2.5 s (~3k accepts/s, 2 cores); at 64, 1-60 ms, or 1-2 s for the ~15% whose
        # SYN the full queue dropped (the kernel resends it after 1 s, then 3 s). Measured
        # with scripts/channel_flood.py.
        self._listener = socket.create_server((host, 0), backlog=64)
        self.address = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept, name="shard-channel", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self.accepted += 1
                self._open.add(conn)
                self._pending[conn] = None
                if len(self._pending) > self._max_pending:
                    oldest, _ = self._pending.popitem(last=False)
                    _hang_up(oldest)  # its thread wakes up with an error and closes it
            threading.Thread(
                target=self._serve, args=(conn,), name="shard-channel-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            framer = self._handshake(_Stream(conn))
            if framer is None:
                return
            while True:
                request = framer.recv_after_idle(self._max_bytes, self._frame_s)
                framer.send(self._handler(request), self._frame_s)
        except (OSError, WireFormatError) as exc:
            log.debug("channel peer left: %s", exc)
        finally:
            with self._lock:
                self._pending.pop(conn, None)
                self._open.discard(conn)
            conn.close()

    def _handshake(self, stream: _Stream) -> _Framer | None:
        deadline = time.monotonic() + self._handshake_s
        hello = stream.read(_HELLO, deadline)
        if hello[: len(MAGIC)] != MAGIC:
            log.warning("refused a channel peer that does not speak the protocol")
            return None
        client_nonce = hello[len(MAGIC) :]
        server_nonce = secrets.token_bytes(NONCE_BYTES)
        proof = _proof(self._secret, b"spt-server", client_nonce, server_nonce)
        stream.send(MAGIC + server_nonce + proof, timeout_s=max(deadline - time.monotonic(), 1e-3))
        answer = stream.read(TAG_BYTES, deadline)
        if not hmac.compare_digest(
            answer, _proof(self._secret, b"spt-client", client_nonce, server_nonce)
        ):
            log.warning("refused a channel peer that failed the challenge")
            return None
        with self._lock:
            if stream.sock not in self._pending:
                return None  # evicted just as it answered
            del self._pending[stream.sock]
        key = _proof(self._secret, b"spt-key", client_nonce, server_nonce)
        framer = _Framer(stream, key, _TO_CLIENT, _TO_SERVER)
        framer.send(b"ok", self._frame_s)
        return framer

    def close(self) -> None:
        """Stop accepting and hang up every connection (their threads then exit)."""
        with self._lock:
            self._closed = True
            conns = list(self._open)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in conns:
            _hang_up(conn)


def _hang_up(conn: socket.socket) -> None:
    """Wake the thread blocked on ``conn`` (``close`` alone would not on Linux)."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class ShardClient:
    """The driver's end of one shard's channel.

    Args:
      address: the shard's channel ``(host, port)``.
      secret: that shard's channel secret.
      timeout_s: bound on connecting, authenticating and each ``send``.
    """

    def __init__(self, address: tuple[str, int], secret: bytes, timeout_s: float) -> None:
        self.address = address
        self.broken = True
        self._timeout_s = timeout_s
        self._sock = socket.create_connection(address, timeout=timeout_s)
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._framer = self._handshake(secret, time.monotonic() + timeout_s)
        except BaseException:
            self._sock.close()
            raise
        self.broken = False

    def _handshake(self, secret: bytes, deadline: float) -> _Framer:
        stream = _Stream(self._sock)
        client_nonce = secrets.token_bytes(NONCE_BYTES)
        stream.send(MAGIC + client_nonce, timeout_s=self._timeout_s)
        try:
            challenge = stream.read(_CHALLENGE, deadline)
        except ChannelClosedError:
            raise ChannelClosedError(f"shard at {self.address} refused the channel") from None
        server_nonce = challenge[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        proof = challenge[len(MAGIC) + NONCE_BYTES :]
        expected = _proof(secret, b"spt-server", client_nonce, server_nonce)
        if challenge[: len(MAGIC)] != MAGIC or not hmac.compare_digest(proof, expected):
            raise ChannelClosedError(
                f"shard at {self.address} did not prove it holds this shard's channel secret"
            )
        stream.send(
            _proof(secret, b"spt-client", client_nonce, server_nonce), timeout_s=self._timeout_s
        )
        key = _proof(secret, b"spt-key", client_nonce, server_nonce)
        framer = _Framer(stream, key, _TO_SERVER, _TO_CLIENT)
        try:
            welcome = framer.recv(16, deadline)
        except (ChannelClosedError, WireFormatError):
            raise ChannelClosedError(f"shard at {self.address} refused the channel") from None
        if welcome != b"ok":
            raise ChannelClosedError(f"shard at {self.address} refused the channel")
        return framer

    def send(self, payload: bytes) -> None:
        try:
            self._framer.send(payload, self._timeout_s)
        except OSError:
            self.broken = True  # a partly written frame leaves the stream unusable
            raise

    def recv(self, deadline: float, max_bytes: int = 1 << 16) -> bytes:
        """The next reply frame (at most ``max_bytes``), verified; raises ``TimeoutError`` at
        ``deadline`` (monotonic) and :class:`ChannelClosedError` on a frame that fails its
        MAC or is too long."""
        try:
            return self._framer.recv(max_bytes, deadline)
        except (OSError, WireFormatError) as exc:
            self.broken = True
            if isinstance(exc, WireFormatError):
                raise ChannelClosedError(f"shard at {self.address}: {exc}") from None
            raise

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self._sock.close()
