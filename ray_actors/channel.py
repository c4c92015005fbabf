"""The commit data plane: one authenticated TCP stream per shard, length-prefixed frames.

Ray starts, places and supervises the shard actors, but an ordinary Ray actor call costs
about 2-3 ms fanned out to four actors on a 2-core machine, and Ray's compiled graphs keep
every actor polling its channel. Per-step traffic therefore goes over a plain socket per
shard (the way vLLM broadcasts scheduler output over its own message queue): the driver
writes one frame per shard and reads one ack frame back, and an idle shard sleeps in
``recv``.

Safety: the shard listens on its node's address (127.0.0.1 for a local cluster) and
accepts a connection only after the peer sends the 32-byte secret it was given through
Ray's authenticated control plane. Frames are bounded in size; what they carry is
:mod:`sharded_pagetable.shard.wire`'s business.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

from sharded_pagetable.errors import WireFormatError

log = logging.getLogger(__name__)

SECRET_BYTES = 32
_HEADER = struct.Struct("<I")


class ChannelClosedError(ConnectionError):
    """The shard's end of the channel is gone (the shard process most likely died)."""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ChannelClosedError("connection closed by peer")
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def recv_frame(sock: socket.socket, max_bytes: int) -> bytes:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size > max_bytes:
        raise WireFormatError(f"frame of {size} bytes exceeds the limit {max_bytes}")
    return _recv_exact(sock, size)


class ShardServer:
    """The shard's end: accepts one authenticated driver at a time and answers frames.

    Args:
      host: address to listen on (the node's IP).
      secret: what a peer must send first.
      handler: turns a request frame into a reply frame (called on the server thread).
      max_bytes: largest request frame accepted.
    """

    def __init__(
        self, host: str, secret: bytes, handler: Callable[[bytes], bytes], max_bytes: int
    ) -> None:
        self._secret = secret
        self._handler = handler
        self._max_bytes = max_bytes
        self._listener = socket.create_server((host, 0))
        self.address = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, name="shard-channel", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    conn.settimeout(10)
                    if not hmac.compare_digest(_recv_exact(conn, SECRET_BYTES), self._secret):
                        log.warning("refused a channel peer with a wrong secret")
                        continue
                    conn.settimeout(None)
                    send_frame(conn, b"ok")
                    while True:
                        request = recv_frame(conn, self._max_bytes)
                        send_frame(conn, self._handler(request))
                except (OSError, WireFormatError) as exc:
                    log.debug("channel peer left: %s", exc)

    def close(self) -> None:
        self._listener.close()


class ShardClient:
    """The driver's end of one shard's channel."""

    def __init__(self, address: tuple[str, int], secret: bytes, timeout_s: float) -> None:
        self.address = address
        self._sock = socket.create_connection(address, timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(secret)
        if recv_frame(self._sock, 16) != b"ok":
            raise ChannelClosedError(f"shard at {address} refused the channel")
        self.broken = False

    def send(self, payload: bytes) -> None:
        try:
            send_frame(self._sock, payload)
        except OSError:
            self.broken = True
            raise

    def recv(self, deadline: float) -> bytes:
        """The next reply frame; raises ``TimeoutError`` at ``deadline`` (monotonic)."""
        try:
            self._sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            return recv_frame(self._sock, 1 << 16)
        except (OSError, WireFormatError) as exc:
            self.broken = True
            if isinstance(exc, WireFormatError):
                raise ChannelClosedError(f"shard at {self.address}: {exc}") from None
            raise

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self._sock.close()
