"""A shard process's end of the KV channel: posts its pages, fetches its peers'.

Every shard actor of a survivable job runs one (:class:`KvPeerServer`), installed for the
model step with :func:`sharded_pagetable.serving.kv_transfer.install`. It is the commit
channel's protocol (:mod:`ray_actors.channel`: mutual HMAC challenge, per-connection key,
MAC on every frame) under a secret shared by the shards of one table and by nobody else:
the table's ``kv_secret``, handed to each shard actor through Ray's authenticated control
plane, like the commit channel's. A request names ``(epoch, round)``; the answer is the
frame this process posted for the asking shard under that key, once it has posted it (the
handler waits up to ``wait_s``), or a refusal. Only the latest epoch's frames are kept.
The request names the shard asking: every shard of the table holds the same secret, and a
peer that holds it is a shard of this table, which may read any of the table's KV pages.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np

from .channel import ShardClient, ShardServer

_REQUEST = struct.Struct("<QII")  # epoch, round, shard asking
_HAVE, _NONE = b"\x01", b"\x00"


class KvPeerServer:
    """Posts and fetches KV frames for shard ``shard``.

    Args:
      host: address to listen on (the node's IP).
      secret: the table's KV secret.
      shard: the shard this process holds.
      wait_s: how long a fetch may wait for its source to post.
    """

    def __init__(self, host: str, secret: bytes, shard: int, wait_s: float) -> None:
        self.shard = shard
        self.peers: dict[int, tuple[str, int]] = {}  # shard -> its KV channel (set per step)
        self._secret = secret
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._epoch = -1  # the latest epoch posted
        self._outbox: dict[tuple[int, int, int], bytes] = {}  # (epoch, round, target) -> frame
        self._clients: dict[int, ShardClient] = {}
        self._torn: list[np.ndarray] | None = None  # per group, pages a step left unwritten
        self._server = ShardServer(host, secret, self._answer, _REQUEST.size)
        self.address = self._server.address

    def _answer(self, request: bytes) -> bytes:
        if len(request) != _REQUEST.size:
            return _NONE
        epoch, rnd, target = _REQUEST.unpack(request)
        key = (epoch, rnd, target)
        deadline = time.monotonic() + self._wait_s
        with self._cond:
            while key not in self._outbox and self._epoch <= epoch:
                left = deadline - time.monotonic()
                if left <= 0 or (self._epoch == epoch and (epoch, rnd, -1) in self._outbox):
                    return _NONE  # posted this round without a frame for it, or too late
                self._cond.wait(left)
            frame = self._outbox.get(key)
        return _NONE if frame is None else _HAVE + frame

    def post(self, key: tuple[int, int], frames: dict[int, bytes]) -> None:
        epoch, rnd = key
        with self._cond:
            if epoch != self._epoch:
                self._outbox.clear()  # frames of older steps are never asked for again
                self._epoch = epoch
            self._outbox[(epoch, rnd, -1)] = b""  # this round is posted
            for target, frame in frames.items():
                self._outbox[(epoch, rnd, target)] = frame
            self._cond.notify_all()

    def _client(self, source: int, reuse: bool) -> tuple[ShardClient, bool]:
        """A connection to ``source``'s KV channel: the open one when ``reuse`` allows, else
        a new one; and whether it was reused."""
        address = tuple(self.peers[source])
        client = self._clients.get(source)
        if reuse and client is not None and not client.broken and client.address == address:
            return client, True
        if client is not None:
            client.close()
        client = self._clients[source] = ShardClient(address, self._secret, 5.0)
        return client, False

    def fetch(self, source: int, key: tuple[int, int], max_bytes: int) -> bytes:
        if source not in self.peers:
            raise ConnectionError(f"no KV channel address for shard {source}")
        deadline = time.monotonic() + self._wait_s + 5.0
        request = _REQUEST.pack(key[0], key[1], self.shard)
        client, reused = self._client(source, reuse=True)
        try:
            client.send(request)
            reply = client.recv(deadline, max_bytes + 1)
        except TimeoutError:
            raise
        except OSError:
            if not reused:
                raise
            # The open connection went to a process that is gone (its replacement may
            # listen at the same address): one new connection, then the answer stands.
            client, _ = self._client(source, reuse=False)
            client.send(request)
            reply = client.recv(deadline, max_bytes + 1)
        if reply[:1] != _HAVE:
            raise ConnectionError(f"shard {source} has no KV pages for shard {self.shard} at {key}")
        return reply[1:]

    def tear(self, pages: Sequence[np.ndarray]) -> None:
        with self._cond:
            if self._torn is None:
                self._torn = [np.asarray(p, np.int64) for p in pages]
            else:
                self._torn = [np.union1d(a, b) for a, b in zip(self._torn, pages, strict=True)]

    def take_torn(self) -> list[np.ndarray] | None:
        """Pages (per group) model steps left unwritten since the last call; None if none."""
        with self._cond:
            torn, self._torn = self._torn, None
        return torn

    def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(OSError):
                client.close()
        self._server.close()
