"""``backend="ray"``: one shard actor per shard, each a JAX process of one multi-controller job."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray

from sharded_pagetable.config import RayOptions
from sharded_pagetable.errors import (
    BatchTooLargeError,
    FencedError,
    RunOnShardsError,
    ShardFailedError,
    WireFormatError,
)
from sharded_pagetable.rows.messages import Ack, Refusal, ShardBatch
from sharded_pagetable.shard.shard import ShardSpec
from sharded_pagetable.shard.wire import WireLimits, decode, decode_reply, encode

from .calls import per_shard
from .channel import ChannelClosedError
from .cluster import connect, reap, release
from .delivery import EpochDelivery
from .launch import (
    ShardSet,
    alive,
    attached_set,
    find_service,
    kill,
    launch,
    missing_spares,
    replace_shard,
    start_spare,
)

log = logging.getLogger(__name__)


class RayBackend:
    """Shard actors on a Ray cluster (local Ray on 127.0.0.1 unless an address is given).

    Args:
      specs: one spec per shard; shard ``i`` becomes JAX process ``i``.
      mesh_axes: axis sizes of the global mesh, e.g. ``{"data": 8}``.
      row_axis: the mesh axis rows are split along.
      options: Ray options (address, devices per shard, timeout, placement).
    """

    def __init__(
        self,
        specs: Sequence[ShardSpec],
        mesh_axes: dict[str, int],
        row_axis: str,
        options: RayOptions,
        *,
        attach: bool = False,
    ) -> None:
        self.options = options
        self.specs = list(specs)
        self.mesh_axes = dict(mesh_axes)
        self.row_axis = row_axis
        self.num_shards = len(specs)
        total = 1
        for size in mesh_axes.values():
            total *= size
        if total != self.num_shards * options.devices_per_shard:
            raise ValueError(
                f"mesh {mesh_axes} has {total} devices but {self.num_shards} shards x "
                f"{options.devices_per_shard} devices_per_shard = "
                f"{self.num_shards * options.devices_per_shard}"
            )
        self._owns_ray = connect(options.address, options.namespace)
        self._pg = None
        self._delivery: EpochDelivery | None = None  # how commit messages reach the shards
        self._limits = WireLimits.for_layout(specs[0].layout, specs[0].widths)
        self._generation = 0  # the coordinator generation this backend last fenced with
        self._sent: list[int] = []  # the shards the last send() reached, in its order
        self.started_shards = not attach  # only shards it started does close() stop
        self.actors: list[Any] = []
        self.placements: list[dict[str, Any]] = []
        self._set: ShardSet | None = None  # the set in use (None when attached)
        self._sparing: threading.Thread | None = None  # starting the next warm spare
        self._standby: ShardSet | None = None  # a started, warmed, idle set (ray.standby)
        self._replacing: threading.Thread | None = None  # starting the next standby
        try:
            if attach:
                self._attach()
            else:
                self._start()
        except BaseException:
            if attach:  # never stop shards this backend did not start
                self.detach()
            else:
                self.close(clean=False)
            raise

    def actor_name(self, shard: int) -> str:
        return f"{self.options.name}-shard-{shard}"

    def _attach(self) -> None:
        """Find the named shard actors of a detached table."""
        if not self.options.detached:
            raise ValueError("attach needs ray.detached: true (named, detached shard actors)")
        names = [self.actor_name(i) for i in range(self.num_shards)]
        service = roster = None
        if self.options.survivable:  # its shards' names are in the service's roster
            service, roster = find_service(self.options)
            names = list(roster["shards"])
            if len(names) != self.num_shards:
                raise ShardFailedError(
                    -1,
                    -1,
                    f"the running table has {len(names)} shards, this config {self.num_shards}",
                    during="attaching",
                )
        for i, name in enumerate(names):
            try:
                actor = ray.get_actor(name, namespace=self.options.namespace)
            except ValueError:
                raise ShardFailedError(
                    i,
                    -1,
                    f"no running actor named {name!r} in namespace {self.options.namespace!r}",
                ) from None
            self.actors.append(actor)
        self.placements = self._gather([a.where.remote() for a in self.actors], "attach")
        for i, (where, spec) in enumerate(zip(self.placements, self.specs, strict=True)):
            want = spec.shape
            if where.get("shape") != want:
                raise ShardFailedError(
                    i,
                    -1,
                    f"the running shard holds a table of shape {where.get('shape')} "
                    f"(rows, shards, device blocks, pages per row), this config {want}",
                    during="attaching",
                )
        keys = self._gather([a.channel_secret.remote() for a in self.actors], "attach")
        tables = [k.table_id for k in keys]
        if len(set(tables)) != 1:
            raise ShardFailedError(0, -1, f"attached shards belong to different tables: {tables}")
        if self.options.placement == "spread":
            try:
                self._pg = ray.util.get_placement_group(f"{self.options.name}-pg")
            except ValueError:
                self._pg = None
        if self.options.survivable:  # what replacing one of its shards takes
            self._set = attached_set(
                self.actors, self.placements, keys, self._pg, self.options, self.actor_name,
                service, roster["spares"],
            )  # fmt: skip
            self._sparing = threading.Thread(
                target=self._new_spares, args=(self._set,), daemon=True
            )
            self._sparing.start()
        self._delivery = EpochDelivery(self.actors, self.placements, keys, self.options)

    def _start(self) -> None:
        self._use(self._new_set())
        if self.options.standby:
            self._standby = self._new_set()

    def _new_set(self) -> ShardSet:
        return launch(self.specs, self.mesh_axes, self.row_axis, self.options, self.actor_name)

    def _use(self, shards: ShardSet) -> None:
        """Make ``shards`` the shards this backend drives."""
        self._set = shards
        self.actors, self.placements, self._pg = shards.actors, shards.placements, shards.pg
        self.started_shards = True  # e.g. an attached table's recovery started new ones
        self._delivery = EpochDelivery(self.actors, self.placements, shards.keys, self.options)

    def replace_dead(self) -> list[int]:
        """Give every shard whose process is gone (or does not answer) a new one; returns
        those shards. A survivable job keeps the others running and the new processes join
        it; otherwise, or when the process hosting the job's coordination service is gone,
        every shard is replaced (:meth:`restart`)."""
        shards = self._set
        if shards is None or shards.service is None:
            self.restart()
            return list(range(self.num_shards))
        wait = min(self.options.timeout_s, 5.0)
        pings = per_shard([a.pid.remote() for a in [*shards.actors, shards.service]], wait)
        if isinstance(pings[-1], BaseException):
            log.warning("the JAX service process is gone: replacing every shard")
            self.restart()
            return list(range(self.num_shards))
        dead = [s for s, r in enumerate(pings[:-1]) if isinstance(r, BaseException)]
        if not dead:
            return []
        self._join_spare()
        if self._delivery is not None:
            self._delivery.close()
            self._delivery = None
        kill([shards.actors[s] for s in dead])
        killed = reap([shards.placements[s] for s in dead])
        if killed:
            log.warning("killed shard processes %s that did not exit when asked", killed)
        for s in dead:
            replace_shard(shards, s, self.specs[s], self.mesh_axes, self.row_axis, self.options)
        self.actors, self.placements = shards.actors, shards.placements
        self._delivery = EpochDelivery(self.actors, self.placements, shards.keys, self.options)
        log.warning("replaced shards %s; the others kept their processes", dead)
        self._sparing = threading.Thread(target=self._new_spares, args=(shards,), daemon=True)
        self._sparing.start()  # the next warm spares, in the background
        return dead

    def _new_spares(self, shards: ShardSet) -> None:
        """A warm spare on every node of ``shards`` that has none (in the background)."""
        for node in missing_spares(shards):
            spare = start_spare(shards, self.options, node)
            if spare is not None and node not in shards.spares and shards is self._set:
                shards.spares[node] = spare
            elif spare is not None:
                kill([spare])

    def _join_spare(self) -> None:
        """Wait for a spare still starting (quicker than starting a process from scratch)."""
        if self._sparing is not None:
            self._sparing.join()
            self._sparing = None

    def restart(self) -> None:
        """Replace every shard process (a JAX job cannot continue without one of them):
        switch to the standby set when there is one (and start its replacement in the
        background), else start a new set now."""
        self._kill_all()
        standby = self._take_standby()
        if standby is None:
            self._use(self._new_set())
            return
        self._use(standby)
        self._replacing = threading.Thread(target=self._launch_standby, daemon=True)
        self._replacing.start()

    def _take_standby(self) -> ShardSet | None:
        if self._replacing is not None:
            self._replacing.join()
            self._replacing = None
        standby, self._standby = self._standby, None
        if standby is not None and not alive(standby):
            kill(standby.actors)
            release(standby.pg)
            return None
        return standby

    def _launch_standby(self) -> None:
        try:
            self._standby = self._new_set()
        except Exception as exc:  # the next recovery starts a set itself
            log.warning("could not start a standby set of shards: %s", exc)

    # -- calls -----------------------------------------------------------------------

    def _gather(self, refs: list, what: str, timeout: float | None = None) -> list[Any]:
        results = per_shard(refs, self.options.timeout_s if timeout is None else timeout)
        for i, res in enumerate(results):
            if isinstance(res, BaseException):
                raise ShardFailedError(i, -1, f"{what} failed: {type(res).__name__}: {res}")
        return results

    def send(self, batches: Sequence[ShardBatch]) -> None:
        """Start delivering a batch to each shard it names (see :class:`EpochDelivery`)."""
        messages = [encode(b) for b in batches]
        for b, m in zip(batches, messages, strict=True):
            if len(m) > self._limits.max_bytes:  # never discovered by a shard
                raise BatchTooLargeError(
                    f"the batch for shard {b.shard} encodes to {len(m)} bytes, over the "
                    f"{self._limits.max_bytes} a shard accepts"
                )
        self._sent = [b.shard for b in batches]
        self._delivery.send(messages, self._sent)

    def collect(self) -> list[Ack | BaseException]:
        """The answers of the shards the last :meth:`send` reached, in its order."""
        return [
            r if isinstance(r, BaseException) else self._reply(s, r)
            for s, r in zip(self._sent, self._delivery.collect(), strict=True)
        ]

    def _reply(self, shard: int, data: bytes) -> Ack | BaseException:
        """A shard's wire reply as an ack, or the exception its refusal stands for."""
        try:
            reply = decode_reply(data, self.num_shards)
        except WireFormatError as exc:
            return ChannelClosedError(f"shard {shard} sent a malformed reply: {exc}")
        if isinstance(reply, Refusal):
            if reply.kind == "fenced":
                return FencedError(self._generation, reply.generation)
            return (WireFormatError if reply.kind == "wire" else RuntimeError)(reply.message)
        if reply.shard != shard:
            return ChannelClosedError(f"shard {shard} answered as shard {reply.shard}")
        return reply

    def _replies(self, refs: list, shards: Sequence[int]) -> list[Ack | BaseException]:
        """Decoded replies of calls made on ``shards`` (in that order)."""
        results = per_shard(refs, self.options.timeout_s)
        return [
            r if isinstance(r, BaseException) else self._reply(s, r)
            for s, r in zip(shards, results, strict=True)
        ]

    def fence(self, generation: int) -> list[Ack | BaseException]:
        self._generation = generation
        refs = [a.fence.remote(generation) for a in self.actors]
        return self._replies(refs, range(self.num_shards))

    def rollback(
        self, shards: Sequence[int], epoch: int, generation: int
    ) -> list[Ack | BaseException]:
        refs = [self.actors[i].rollback.remote(epoch, generation) for i in shards]
        return self._replies(refs, shards)

    def device_snapshot(self, group: int) -> np.ndarray:
        parts = self._gather([a.snapshot.remote(group) for a in self.actors], "snapshot")
        return np.concatenate(parts)

    def step_snapshot(self) -> list:
        return self._gather([a.step_snapshot.remote() for a in self.actors], "step_snapshot")

    def run_on_shards(self, fn: Callable[..., Any], *args: Any, step: bool = False) -> list[Any]:
        """``fn`` in every shard process. What ``fn`` raises (or a result that cannot be sent
        back) is the caller's :class:`RunOnShardsError`; only a shard that is gone or does not
        answer within ``timeout_s`` is a shard failure."""
        peers = {s: where.get("kv") for s, where in enumerate(self.placements)}
        results = per_shard(
            [a.run.remote(fn, args, step, peers) for a in self.actors], self.options.timeout_s
        )
        # A shard that is gone comes first: it explains what failed in the others (a model
        # step waiting on its KV pages).
        for i, res in enumerate(results):
            if isinstance(res, BaseException) and not isinstance(res, ray.exceptions.RayTaskError):
                raise ShardFailedError(
                    i, -1, f"{type(res).__name__}: {res}", during="running a run_on_shards function"
                )
        for i, res in enumerate(results):
            if isinstance(res, ray.exceptions.RayTaskError):
                cause = getattr(res, "cause", None) or res
                raise RunOnShardsError(i, type(cause).__name__, str(cause)[:2000]) from None
        return results

    def drop_kv_copies(self, pools: Sequence[tuple[int, int]]) -> list[list[np.ndarray]]:
        pools = [(int(lo), int(hi)) for lo, hi in pools]
        lost = self._gather([a.drop_kv_copies.remote(pools) for a in self.actors], "drop copies")
        return lost

    def status(self) -> list[Ack]:
        replies = self._gather([a.status.remote() for a in self.actors], "status")
        out = [self._reply(i, r) for i, r in enumerate(replies)]
        for i, r in enumerate(out):
            if isinstance(r, BaseException):
                raise ShardFailedError(i, -1, f"status failed: {r}")
        return out

    def reseed(
        self, shards: Sequence[int], states: Sequence[ShardBatch | None], generation: int
    ) -> list[Ack | BaseException]:
        messages = [None if b is None else encode(b) for b in states]
        refs = [
            self.actors[s].reseed.remote(m, generation)
            for s, m in zip(shards, messages, strict=True)
        ]
        return self._replies(refs, shards)

    def export(self, generations: Sequence[int]) -> list[ShardBatch | BaseException | None]:
        refs = [a.export.remote(g) for a, g in zip(self.actors, generations, strict=True)]
        return [
            m if isinstance(m, BaseException) else self._state(i, m)
            for i, m in enumerate(per_shard(refs, self.options.timeout_s))
        ]

    def _state(self, shard: int, message: bytes | None) -> ShardBatch | BaseException | None:
        """An exported full state, or the exception its refusal (or malformed bytes) stands for."""
        if message is None:
            return None
        try:
            return decode(message, self._limits)
        except WireFormatError as exc:
            error = WireFormatError(f"shard {shard} exported a malformed state: {exc}")
        with contextlib.suppress(WireFormatError):
            if isinstance(decode_reply(message, self.num_shards), Refusal):
                return self._reply(shard, message)  # a refusal instead of a state
        return error

    def group_array(self, group: int):
        raise RuntimeError(
            "with backend='ray' each group's global array lives in the shard processes; "
            "use run_on_shards(fn) to compute on it or device_snapshot(g) to read it"
        )

    def _kill_all(self) -> None:
        if self._delivery is not None:
            self._delivery.close()
            self._delivery = None
        actors, self.actors = self.actors, []
        self._join_spare()
        if self._set is not None:
            actors += list(self._set.spares.values())
            actors += [self._set.service] if self._set.service is not None else []
        self._set = None
        kill(actors)
        killed = reap(self.placements)  # a stopped process must not keep its devices
        if killed:
            log.warning("killed shard processes %s that did not exit when asked", killed)
        release(self._pg)
        self._pg = None

    def close(self, clean: bool = True) -> None:
        """Stop every shard actor. ``clean=False`` skips the JAX distributed shutdown (its
        barrier would wait for a dead process) and kills the actors at once."""
        if self._delivery is not None:
            self._delivery.close()
            self._delivery = None
        if self.actors and clean:
            service = [] if self._set is None or self._set.service is None else [self._set.service]
            refs = [a.shutdown.remote() for a in [*self.actors, *service]]
            ray.wait(refs, num_returns=len(refs), timeout=10)
        self.stop_shards()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def stop_shards(self) -> None:
        """Kill every shard process this backend drives (and its standby set, spares and
        service process) and release their placement groups, leaving Ray itself running:
        what a table dropped without ``close()`` does (other tables may share this Ray)."""
        if self._delivery is not None:
            self._delivery.close()
            self._delivery = None
        self._kill_all()
        standby = self._take_standby()
        if standby is not None:
            kill(standby.actors)
            reap(standby.placements)
            release(standby.pg)

    def detach(self) -> None:
        """Forget the actors without stopping them (a detached table outlives this driver,
        with its warm spares, which the next coordinator adopts)."""
        if self._delivery is not None:
            self._delivery.close()
            self._delivery = None
        self._join_spare()
        spares = [] if self._set is None else list(self._set.spares.values())
        if not self.options.detached:
            kill(spares)  # only a detached table's spares are named, for the next coordinator
        self._set = None
        self.actors = []
        self._pg = None
