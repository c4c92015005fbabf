"""The shard actor: one JAX process of a multi-controller job, owning one shard's rows.

Each actor sets its device count before JAX starts, joins the job with
``jax.distributed.initialize`` (shard 0's node hosts the JAX coordinator on a port it
picks), builds the same global mesh as every other actor, refuses a mesh on which its rows
would live elsewhere, and from then on only takes wire bytes: through Ray calls, or through
its commit channel (:mod:`ray_actors.channel`) whose server thread shares the shard under a
lock with the actor's methods.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .channel import ChannelKey


@dataclass(frozen=True)
class JobSeat:
    """Where shard processes sit in their JAX distributed job.

    Args:
      coordinator: ``ip:port`` of JAX's coordination service.
      num_shards: shard processes in the job.
      heartbeat_timeout_s: how long the service waits on a silent process.
      survivable: the service runs in a process of its own (process 0, holding no shard:
        :class:`JaxService`) and every process has JAX recoverability on, so a dead shard
        process does not take the job down and a replacement joins under the same process
        id; otherwise shard 0 hosts the service and any death ends the job.
    """

    coordinator: str
    num_shards: int
    heartbeat_timeout_s: int
    survivable: bool = False

    @property
    def first_shard_process(self) -> int:
        return 1 if self.survivable else 0

    @property
    def num_processes(self) -> int:
        return self.num_shards + self.first_shard_process

    def join(self, shard: int | None) -> int:
        """Join the job as shard ``shard``'s process (None: the service process); returns
        the JAX process index."""
        import jax

        process = 0 if shard is None else shard + self.first_shard_process
        if self.survivable:
            jax.config.update("jax_enable_recoverability", True)
        kwargs = {}
        if process == 0:
            kwargs["coordinator_bind_address"] = self.coordinator  # not every interface
        jax.distributed.initialize(
            coordinator_address=self.coordinator,
            num_processes=self.num_processes,
            process_id=process,
            initialization_timeout=120,
            heartbeat_timeout_seconds=self.heartbeat_timeout_s,
            cluster_detection_method="deactivate",
            **kwargs,
        )
        if jax.process_index() != process:
            raise RuntimeError(f"{shard=} joined as JAX process {jax.process_index()}")
        return process


def node_address() -> str:
    """``ip:port`` free on this node, for the JAX coordination service."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        port = s.getsockname()[1]
    return f"{ip}:{port}"


class JaxService:
    """JAX process 0 of a survivable shard job: hosts the coordination service and holds no
    shard, so no shard's death can take the service down. Wrapped with ``ray.remote``."""

    def __init__(self, platform: str) -> None:
        if platform == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
            import jax

            jax.config.update("jax_num_cpu_devices", 1)
        self._joined = False
        # Actor names of a detached table's shard processes and warm spares (by node): a
        # replacement gets a name of its own, and a coordinator that attaches asks here.
        self._roster: dict[str, Any] = {"shards": [], "spares": {}}

    def roster(self) -> dict[str, Any]:
        return self._roster

    def enlist(self, shard: int | None, name: str | None, node: str | None = None) -> None:
        """Record ``name`` as shard ``shard``'s actor, or (``shard`` None) as the warm spare
        on ``node`` (``name`` None: that node has none now)."""
        if shard is None:
            if name is None:
                self._roster["spares"].pop(node, None)
            else:
                self._roster["spares"][node] = name
            return
        names = self._roster["shards"]
        names.extend([None] * (shard + 1 - len(names)))
        names[shard] = name

    def node_address(self) -> str:
        return node_address()

    def start(self, job: JobSeat) -> int:
        """Start the service and join as process 0 (returns when every shard joined)."""
        job.join(None)
        self._joined = True
        return os.getpid()

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        import jax

        if self._joined:
            self._joined = False
            jax.distributed.shutdown()


def refusal(shard_id: int, exc: Exception) -> Any:
    """The :class:`~sharded_pagetable.rows.messages.Refusal` a shard answers ``exc`` with."""
    from sharded_pagetable.errors import FencedError, WireFormatError
    from sharded_pagetable.rows.messages import Refusal

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FencedError):
        return Refusal(shard_id, "fenced", text, exc.holder)
    return Refusal(shard_id, "wire" if isinstance(exc, WireFormatError) else "error", text)


class FrameHandler:
    """What a shard process does with one commit frame, wherever it comes from (its channel,
    or the actor's ``apply``): the shard applies it under ``lock``, and the answer is its
    ack or a refusal saying why, in the wire format. The wall time of each call goes to
    ``seconds``. ``scripts/bench_frame.py`` times this same object."""

    def __init__(self, shard: Any, lock: threading.Lock, seconds: deque[float]) -> None:
        from sharded_pagetable.shard.wire import encode_reply

        self._apply = shard.apply
        self._shard_id = shard.spec.shard_id
        self._lock = lock
        self._seconds = seconds
        self._encode = encode_reply

    def __call__(self, request: bytes) -> bytes:
        t0 = time.perf_counter()
        with self._lock:
            try:
                result = self._apply(request)
            except Exception as exc:
                result = refusal(self._shard_id, exc)
        reply = self._encode(result)
        self._seconds.append(time.perf_counter() - t0)
        return reply


class ShardActor:
    """Hosts a :class:`sharded_pagetable.shard.Shard`; wrapped with ``ray.remote`` by the
    backend so resources and placement are chosen at creation time."""

    def __init__(self, shard_id: int, num_shards: int, devices: int, platform: str) -> None:
        self.shard_id = shard_id
        self.num_shards = num_shards
        if platform == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        if platform == "cpu":
            jax.config.update("jax_num_cpu_devices", devices)

        self._shard = None
        self._joined = False
        self._lock = threading.Lock()  # the shard is shared with the channel thread
        self._where: dict[str, Any] = {}
        self._key: ChannelKey | None = None  # this shard's channel secret and its table's id
        self._server = None
        self._kv = None  # the KV channel of a survivable job (ray_actors.kv_peer)
        self._apply_s: deque[float] = deque(maxlen=4096)
        self._frames: FrameHandler | None = None  # the shard's commit frames (see start)

    def node_address(self) -> str:
        """``ip:port`` on this node for the JAX coordination service (called on shard 0)."""
        return node_address()

    def warm(self) -> int:
        """Import and load everything a shard needs before it joins a job (JAX, the
        compiled row kernels from their cache, the channel), so a warm spare that becomes a
        replacement only joins, builds its shard and answers; returns its pid."""
        import jax  # noqa: F401

        import sharded_pagetable.shard.shard  # noqa: F401

        from . import channel  # noqa: F401

        return os.getpid()

    def start(
        self,
        job: JobSeat,
        spec: Any,
        mesh_axes: Mapping[str, int],
        row_axis: str,
        key: ChannelKey,
        kv_secret: bytes | None = None,
    ) -> dict[str, Any]:
        """Join the JAX job, build the mesh, the shard and its channel (and, given the
        table's ``kv_secret``, the KV channel model steps move pages over); returns where it
        landed (including the channels' addresses)."""
        import jax
        import ray

        from sharded_pagetable.routing.layout import ShardLayout
        from sharded_pagetable.routing.mesh import build_mesh, check_ownership, row_sharding
        from sharded_pagetable.shard.shard import Shard

        from .channel import ShardServer
        from .cluster import process_start_ticks

        self.shard_id = spec.shard_id  # a warm spare learns its shard here
        process = job.join(self.shard_id)
        self._seat = (job, kv_secret)
        self._joined = True
        # The mesh is every shard's devices: a service process (survivable jobs) holds none.
        devices = [d for d in jax.devices() if d.process_index >= job.first_shard_process]
        mesh = build_mesh(mesh_axes, row_axis, devices)
        layout: ShardLayout = spec.layout
        owners = {s: s + job.first_shard_process for s in range(layout.num_shards)}
        check_ownership(mesh, row_axis, layout, owners)
        self._shard = Shard(spec, row_sharding(mesh, row_axis))
        self._frames = FrameHandler(self._shard, self._lock, self._apply_s)
        node_ip = ray.util.get_node_ip_address()
        self._key = key
        self._server = ShardServer(
            node_ip, key.secret, self._frames, self._shard.limits.max_bytes + 64
        )
        if kv_secret is not None:
            from sharded_pagetable.serving import kv_transfer

            from .kv_peer import KvPeerServer

            self._kv = KvPeerServer(node_ip, kv_secret, self.shard_id, job.heartbeat_timeout_s)
            kv_transfer.install(self._kv)
        self._where = {
            "shard": self.shard_id,
            "process": process,
            "pid": os.getpid(),
            "start_ticks": process_start_ticks(os.getpid()),
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": node_ip,
            "devices": [str(d) for d in jax.local_devices()],
            "rows": (self._shard.lo, self._shard.hi),
            "channel": list(self._server.address),
            "kv": None if self._kv is None else list(self._kv.address),
            "shape": spec.shape,
        }
        return self._where

    def _reply(self, fn: Callable[..., Any], *args: Any) -> bytes:
        """``fn(*args)`` on the shard under the lock, answered in the wire format: its ack,
        or a refusal saying why (the driver decides what a refusal means)."""
        from sharded_pagetable.shard.wire import encode_reply

        with self._lock:
            try:
                result = fn(*args)
            except Exception as exc:
                result = self._refusal(exc)
        return encode_reply(result)

    def _refusal(self, exc: Exception):
        return refusal(self.shard_id, exc)

    def apply(self, message: bytes) -> bytes:
        if self._frames is None:
            raise RuntimeError(f"shard actor {self.shard_id} holds no shard (start it first)")
        return self._frames(message)

    def apply_seconds(self) -> list[float]:
        """Wall time of the recent ``apply`` calls inside this process (for benchmarks)."""
        return list(self._apply_s)

    def fence(self, generation: int) -> bytes:
        return self._reply(self._shard.fence, generation)

    def rollback(self, epoch: int, generation: int) -> bytes:
        return self._reply(self._shard.rollback, epoch, generation)

    def reseed(self, message: bytes | None, generation: int) -> bytes:
        return self._reply(self._shard.reseed, message, generation)

    def status(self) -> bytes:
        return self._reply(self._shard.status)

    def export(self, generation: int) -> bytes | None:
        """This shard's rows as a full-state wire message at its epoch (None at epoch 0), or
        a refusal reply when ``generation`` may not read them."""
        from sharded_pagetable.shard.wire import encode, encode_reply

        with self._lock:
            try:
                state = self._shard.export(generation)
            except Exception as exc:
                return encode_reply(self._refusal(exc))
        return None if state is None else encode(state)

    def snapshot(self, group: int):
        with self._lock:
            return self._shard.snapshot(group)

    def where(self) -> dict[str, Any]:
        return self._where

    def seat(self) -> tuple[JobSeat, bytes | None] | None:
        """Where this process sits in its job and the table's KV secret, for a coordinator
        that attaches to a survivable table and may have to replace a shard of it (over
        Ray's authenticated control plane, like :meth:`channel_secret`)."""
        return getattr(self, "_seat", None)

    def name(self) -> str | None:
        """This actor's Ray name (None when it has none)."""
        import ray

        return ray.get_runtime_context().get_actor_name() or None

    def channel_secret(self) -> ChannelKey | None:
        """This shard's :class:`~ray_actors.channel.ChannelKey`, for a coordinator that
        attaches to it (over Ray's authenticated control plane)."""
        return self._key

    def run(
        self,
        fn: Callable[..., Any],
        args: tuple,
        step: bool = False,
        peers: Mapping[int, Any] | None = None,
    ) -> Any:
        """``fn`` on this shard's arrays (see ``run_on_shards``); ``peers``: every shard's
        KV channel address, for a model step that moves KV pages between shards."""
        from sharded_pagetable.shard.shard import step_of

        if self._kv is not None and peers is not None:
            self._kv.peers = {int(s): tuple(a) for s, a in peers.items() if a is not None}
        with self._lock:
            shard = self._shard
            if not step:
                return fn(shard.group_arrays(), *args)
            view = step_of([shard], self.num_shards)
            return fn(shard.group_arrays(), view, *args)

    def drop_kv_copies(self, pools: list[tuple[int, int]]) -> list:
        """Forget pending KV copies touching the page ``pools`` of replaced shards; returns
        per group the pages whose KV will not arrive: those copies, and what earlier model
        steps left torn."""
        import numpy as np

        with self._lock:
            lost = self._shard.drop_kv_copies(pools)
            torn = None if self._kv is None else self._kv.take_torn()
        if torn is not None:
            lost = [np.union1d(a, b) for a, b in zip(lost, torn, strict=False)] or torn
        return lost

    def step_snapshot(self):
        with self._lock:
            return self._shard.step_snapshot()

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        import jax

        if self._server is not None:
            self._server.close()
        if self._kv is not None:
            from sharded_pagetable.serving import kv_transfer

            kv_transfer.install(None)
            self._kv.close()
        self._shard = self._frames = None
        if self._joined:
            self._joined = False
            jax.distributed.shutdown()
