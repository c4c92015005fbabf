"""How one epoch's messages reach the shard actors, and their replies come back.

``ray.channel`` picks the path: ``socket`` (default: one authenticated stream per shard,
:mod:`.channel`), ``compiled`` (a Ray compiled graph) or ``actor`` (ordinary actor calls).
Whatever the path, :meth:`EpochDelivery.send` hands every shard the epoch touches its frame
before any reply is read, and :meth:`EpochDelivery.collect` returns, per such shard, the
reply bytes or the exception that stands for that shard's failure. A shard the epoch does
not touch is neither written to nor waited on (the compiled graph, which runs every actor,
is used only for an epoch that touches them all).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from sharded_pagetable.config import RayOptions
from sharded_pagetable.errors import ShardFailedError

from .calls import ShardTimeoutError, per_shard
from .channel import ChannelClosedError, ChannelKey, ShardClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Frames:
    """Frames written to the shards' channels: per shard None, or the error that kept its
    frame from going out (which stands for its reply)."""

    shards: list[int]
    failed: list[BaseException | None]


@dataclass(frozen=True)
class _GraphRun:
    """One execution of the compiled graph, and its messages for a re-send over actor calls
    should the graph fail."""

    refs: Any  # what the graph's execute() returned: one reference per shard
    messages: Sequence[bytes]
    shards: list[int]


@dataclass(frozen=True)
class _ActorCalls:
    """One ``apply`` actor call per shard."""

    refs: list[Any]  # ray.ObjectRef per shard


_InFlight = _Frames | _GraphRun | _ActorCalls


class EpochDelivery:
    """The commit path to ``actors`` (in shard order).

    Args:
      actors: the shard actor handles.
      placements: each actor's ``where()`` (its channel address among them).
      keys: each shard's channel key (``ray.channel: socket`` only).
      options: the Ray options (channel kind, timeout).
    """

    def __init__(
        self,
        actors: Sequence[Any],
        placements: Sequence[dict[str, Any]],
        keys: Sequence[ChannelKey] | None,
        options: RayOptions,
    ) -> None:
        self.actors = list(actors)
        self.options = options
        self._clients: list[ShardClient] = []
        self._cdag = None  # compiled graph delivering apply messages
        self._graph_broken = False
        self._in_flight: _InFlight | None = None  # what send() started, for collect()
        if options.channel == "socket":
            for i, (where, key) in enumerate(zip(placements, keys, strict=True)):
                try:
                    client = ShardClient(tuple(where["channel"]), key.secret, options.timeout_s)
                except OSError as exc:
                    self.close()
                    raise ShardFailedError(i, -1, f"cannot open the commit channel: {exc}") from exc
                self._clients.append(client)

    def send(self, messages: Sequence[bytes], shards: Sequence[int]) -> None:
        """Start delivering ``messages[i]`` to shard ``shards[i]`` (increasing shards).

        Over the socket channel every frame is written before any reply is read, so the
        coordinator's own work overlaps the shards'. Otherwise the messages go through the
        compiled graph when there is one and the epoch reaches every shard, else ordinary
        actor calls.
        """
        shards = list(shards)
        if self._clients:
            failed = [self._send_frame(s, m) for s, m in zip(shards, messages, strict=True)]
            self._in_flight = _Frames(shards, failed)
            return
        graph = self._graph() if len(shards) == len(self.actors) else None
        if graph is not None:
            try:
                self._in_flight = _GraphRun(graph.execute(*messages), messages, shards)
                return
            except Exception as exc:
                log.warning("compiled graph failed (%s); re-sending with actor calls", exc)
                self._teardown_graph(broken=True)
        self._in_flight = _ActorCalls(self._apply_calls(messages, shards))

    def _apply_calls(self, messages: Sequence[bytes], shards: Sequence[int]) -> list[Any]:
        return [self.actors[s].apply.remote(m) for s, m in zip(shards, messages, strict=True)]

    def _send_frame(self, i: int, message: bytes) -> BaseException | None:
        client = self._clients[i]
        if client.broken:
            return ChannelClosedError(f"shard {i}'s channel is closed")
        try:
            client.send(message)
        except OSError as exc:
            return exc
        return None

    def collect(self) -> list[bytes | BaseException]:
        """The reply of every shard the last :meth:`send` reached, in its order. Any trouble on the compiled graph
        tears it down and re-sends over actor calls, which tells the shards apart (a shard
        that already applied the epoch acknowledges the re-send only)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            raise RuntimeError("collect() has no send() to answer")
        if isinstance(in_flight, _Frames):
            return self._collect_channel(in_flight.shards, in_flight.failed)
        refs = in_flight.refs
        if isinstance(in_flight, _GraphRun):
            try:
                return list(ray.get(refs, timeout=self.options.timeout_s))
            except Exception as exc:
                log.warning("compiled graph failed (%s); re-sending with actor calls", exc)
                self._teardown_graph(broken=True)
                refs = self._apply_calls(in_flight.messages, in_flight.shards)
        return per_shard(refs, self.options.timeout_s)

    def _collect_channel(
        self, shards: list[int], sent: list[BaseException | None]
    ) -> list[bytes | BaseException]:
        deadline = time.monotonic() + self.options.timeout_s
        out: list[bytes | BaseException] = []
        for i, failed in zip(shards, sent, strict=True):
            client = self._clients[i]
            if failed is not None:
                out.append(failed)
                continue
            try:
                out.append(client.recv(deadline))
            except TimeoutError:
                client.close()  # a late reply must not be read as the next epoch's
                out.append(
                    ShardTimeoutError(f"shard {i} did not answer within {self.options.timeout_s}s")
                )
            except OSError as exc:
                out.append(exc)
        return out

    def _graph(self):
        """The compiled apply graph, compiled on first use; None when disabled or broken."""
        if self._cdag is None and self.options.channel == "compiled" and not self._graph_broken:
            try:
                from ray.dag import InputNode, MultiOutputNode

                with InputNode() as inp:
                    dag = MultiOutputNode([a.apply.bind(inp[i]) for i, a in enumerate(self.actors)])
                self._cdag = dag.experimental_compile(_submit_timeout=self.options.timeout_s)
            except Exception as exc:
                log.warning("compiled graphs unavailable (%s); using actor calls", exc)
                self._graph_broken = True
        return self._cdag

    def _teardown_graph(self, broken: bool = False) -> None:
        cdag, self._cdag = self._cdag, None
        self._graph_broken = self._graph_broken or broken
        if cdag is not None:
            try:
                cdag.teardown()
            except Exception as exc:  # an actor of the graph may be dead already
                log.debug("graph teardown: %s", exc)

    def close(self) -> None:
        """Close every channel and tear down the graph (idempotent)."""
        clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._teardown_graph()
