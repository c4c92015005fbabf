"""The coordinator: the scheduler's single entry point to a table sharded over processes.

:class:`ShardedPageTable` holds the table's lock and delegates to parts with one owner each:

- the :class:`~.mirror.Mirror` owns every row on the host (row operations, their
  validation, page pools) and stages and publishes epochs;
- the :class:`~.committer.EpochCommitter` owns the epoch state (epoch, generation, what
  every shard must report, the epoch in flight) and sends and confirms epochs;
- :class:`~.health.Health` owns the failed / fenced state and the recovery policy;
- the :class:`~.lifecycle.ShardLifecycle` owns whether the shards run yet (they start at
  first use) and the backend once they do;
- the backend (:mod:`.backend`) owns the shards, wherever they live.

Cross-shard moves and swaps are resolved in the mirror and reach the shards as ordinary row
replacements, so shards never talk to each other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ..config import RayOptions, TableConfig, TableDefaults
from ..constants import cdiv
from ..defaults import default_config
from ..errors import FencedError, ShardFailedError
from ..routing.pools import PagePools
from ..shard.step_inputs import StepInputs
from ..shard.wire import WireLimits
from ..table.host import HostRows
from ..table.page_table import check_page_sizes
from ..table.validation import check_count, check_index
from .attach import take_over
from .backend import Backend
from .committer import EpochCommitter
from .epochs import EpochPlan, new_generation
from .health import Health
from .lifecycle import ShardLifecycle
from .metrics import TableMetrics
from .mirror import Mirror
from .reads import gather_step_inputs
from .receipt import CommitReceipt
from .start import ShardShape, check_args, check_pool_pages, plan_backend
from .view import GroupView

log = logging.getLogger(__name__)


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` under the table's lock, so scheduler threads may share a table."""

    @functools.wraps(method)
    def call(self: ShardedPageTable, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return call


def _row_op(name: str) -> Callable[..., Any]:
    """The mirror's row operation ``name`` as a method of the table: under the lock, and
    refused once the table is closed (it must not change a mirror nobody will publish)."""
    method = getattr(Mirror, name)

    @functools.wraps(method)
    def call(self: ShardedPageTable, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        return getattr(self._mirror, name)(*args, **kwargs)

    return _locked(call)


def _device_tensor(table: weakref.ref[ShardedPageTable], group: int) -> jax.Array:
    """``t[group].get_device_tensor()`` of the table ``table`` refers to."""
    live = table()
    if live is None:
        raise RuntimeError("the ShardedPageTable of this group view was dropped")
    return live._group_array(group)


class ShardedPageTable:
    """``MultiGroupPageTable`` semantics with rows sharded over ``num_shards`` shards.

    Built the way ``MultiGroupPageTable`` is (the same arguments by position and keyword,
    ``sharding`` included); each keyword below that is not given (None) comes from the
    default in effect (``sp.configure``, else ``$SHARDED_PAGETABLE_CONFIG``, else one
    in-process shard: :mod:`sharded_pagetable.defaults`). The shards start at the first call
    that needs them (a commit, a device read, ``run_on_shards``; or :meth:`start`), so a
    table used on the host only costs its host mirror.

    Args:
      max_num_reqs, max_model_len, max_num_batched_tokens, page_sizes: as in
        ``MultiGroupPageTable``. Any ``max_num_reqs``: the row capacity
        (``layout.max_num_reqs``) rounds it up to split over the row axis and the shards,
        and rows at or past ``max_num_reqs`` are refused as ``MultiGroupPageTable`` refuses
        them.
      sharding: ``MultiGroupPageTable``'s fifth argument. Its devices are where in-process
        shards build their mesh (a ``NamedSharding`` whose mesh has ``row_axis`` is used as
        it is) unless ``mesh`` says otherwise; the arrays are always split over the row
        axis. Ray shard processes own their devices and do not use it.
      num_shards: shard processes (``backend="ray"``) or in-process shards (``"local"``;
        these may outnumber the devices of the row axis and share them).
      backend: ``"local"`` (embedded), ``"ray"``, or a started object implementing
        :class:`~.backend.Backend` with ``layout`` and ``mesh_axes`` (shards that live
        elsewhere: tools, benchmarks, tests).
      mesh: a ``Mesh`` (local backend), a mapping of axis sizes such as
        ``{"data": 4, "model": 2}``, or None for a 1-D mesh named ``row_axis`` over every
        device (or those of ``sharding``).
      row_axis: mesh axis the rows are split along.
      num_pages: if given, page ids must be below it.
      pages_per_shard: KV-local page pools: shard ``s`` owns page ids ``[s*P, (s+1)*P)``
        and a row may only hold pages of its own shard's pool.
      warmup: compile device-update buckets and kernels when the shards start.
      recover: ``"manual"`` (a lost shard fails the table closed until ``recover()``) or
        ``"auto"`` (recovered inside the failing call, up to ``max_recoveries`` times).
      ray: options of the Ray backend (address, devices per shard, timeout, placement).
      metrics: True (or a :class:`TableMetrics`) to record Prometheus metrics in
        ``t.metrics`` (off by default: no cost).

    Example::

      with ShardedPageTable(1024, 32768, 8192, [16, 64], num_shards=4) as t:
          t.add_row([[1, 2], [9]], row_idx=0)
          t.move_row(0, 700)          # rows 0 and 700 live on different shards
          receipt = t.commit(1024)    # the shards start here
    """

    def __init__(
        self,
        max_num_reqs: int,
        max_model_len: int,
        max_num_batched_tokens: int,
        page_sizes: Sequence[int],
        sharding: jax.sharding.Sharding | None = None,
        *,
        num_shards: int | None = None,
        backend: str | Backend | None = None,
        mesh: Mesh | Mapping[str, int] | None = None,
        row_axis: str | None = None,
        num_pages: int | None = None,
        pages_per_shard: int | None = None,
        warmup: bool | None = None,
        recover: str | None = None,
        max_recoveries: int | None = None,
        ray: RayOptions | Mapping[str, Any] | None = None,
        metrics: bool | TableMetrics | None = None,
        _defaults: TableDefaults | None = None,
        _attach: bool = False,
    ) -> None:
        page_sizes = check_page_sizes(page_sizes)
        if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError(f"sharding must be a jax.sharding.Sharding or None, got {sharding!r}")
        o = (default_config() if _defaults is None else _defaults).merged(
            num_shards=num_shards,
            backend=backend,
            mesh=mesh,
            row_axis=row_axis,
            num_pages=num_pages,
            pages_per_shard=pages_per_shard,
            warmup=warmup,
            recover=recover,
            max_recoveries=max_recoveries,
            ray=ray,
            metrics=metrics,
        )
        num_shards, backend, row_axis = o["num_shards"], o["backend"], o["row_axis"]
        check_args(
            (max_num_reqs, max_model_len, max_num_batched_tokens, page_sizes), num_shards, backend
        )
        max_num_reqs, max_model_len = int(max_num_reqs), int(max_model_len)  # numpy ints too
        max_num_batched_tokens, num_shards = int(max_num_batched_tokens), int(num_shards)
        self._lock = threading.RLock()
        self._health = Health(o["recover"], o["max_recoveries"])  # checked before anything
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.page_sizes = page_sizes
        self.backend_name = backend if isinstance(backend, str) else type(backend).__name__
        self.row_axis = row_axis
        self.widths = tuple(cdiv(max_model_len, s) for s in page_sizes)
        self.recoveries: list[float] = []  # seconds each recovery took
        self.lost_kv_rows = np.empty(0, np.int32)  # i32[k] live rows the last recovery lost
        self.metrics = TableMetrics() if o["metrics"] is True else o["metrics"] or None
        shape = ShardShape(
            max_num_reqs, num_shards, self.widths, page_sizes, max_num_batched_tokens, o["warmup"]
        )
        plan = plan_backend(backend, shape, o["mesh"], row_axis, o["ray"], _attach, sharding)
        self.layout, self.mesh_axes = plan.layout, plan.mesh_axes
        pools, num_pages = None, o["num_pages"]
        if o["pages_per_shard"] is not None:
            pools = PagePools(num_shards, self.layout.rows_per_shard, o["pages_per_shard"])
            num_pages = check_pool_pages(num_pages, pools)
        self._mirror = Mirror(
            self.layout, self.widths, page_sizes, max_num_batched_tokens, num_pages, pools
        )
        for host in self._mirror.hosts:  # rows past max_num_reqs: capacity, always empty
            host.limit_rows(max_num_reqs)
        limits = WireLimits.for_layout(self.layout, self.widths)
        self._committer = EpochCommitter(self._mirror, limits, self.metrics)
        me = weakref.ref(self)  # no cycle: a table nobody holds is freed (and stops) at once
        self._views = [
            GroupView(host, max_num_batched_tokens, functools.partial(_device_tensor, me, g))
            for g, host in enumerate(self._mirror.hosts)
        ]
        self._attaching = _attach
        self._shards = ShardLifecycle(plan)
        if _attach or not isinstance(backend, str):  # nothing to defer
            self._started()

    def _started(self) -> Backend:
        """The running backend: the shards start, and are fenced, at the first call that
        needs them (see :mod:`.lifecycle`). Raises once the table is closed."""
        return self._shards.get(self, self._take_shards)

    def _take_shards(self, backend: Backend) -> None:
        """Fence the shards this table started, or take over running ones (attach)."""
        committer = self._committer
        if self._attaching:  # the previous coordinator stays in charge unless this completes
            taken = take_over(backend, self._mirror)
            committer.generation, committer.epoch = taken.generation, taken.epoch
            committer.expected = taken.expected
            committer.held[:] = taken.held
            self._health.failed = taken.lost
        else:  # a generation above every one the shards obeyed
            committer.generation = new_generation(max(a.generation for a in backend.status()))
            committer.fence(backend)

    @property
    def _backend(self) -> Backend | None:
        """The running backend (its shards started now if need be), None once closed: for
        tools and tests that reach the shards directly. Once they run it takes no lock, so
        another thread may reach them during a long call (a model step, a commit)."""
        shards = self._shards
        if shards.backend is not None and not shards.closed:
            return shards.backend
        with self._lock:
            return None if shards.closed else self._started()

    @property
    def started(self) -> bool:
        """Whether the shards run yet (they start at the first call that needs them)."""
        return self._shards.started

    def start(self) -> ShardedPageTable:
        """Start the shards now rather than at the first call that needs them (a commit, a
        device read, ``run_on_shards``): a serving loop calls it at set-up so its first step
        does not pay the start (seconds for Ray shard processes). Returns the table."""
        with self._lock:
            self._started()
        return self

    @classmethod
    def from_config(cls, config: TableConfig | str, **overrides: Any) -> ShardedPageTable:
        """Build a table from a :class:`TableConfig` or a YAML file of ``configs/``."""
        config = TableConfig.resolve(config, **overrides)
        return cls(*config.shape(), _defaults=config.defaults())

    @classmethod
    def attach(cls, config: TableConfig | str, **overrides: Any) -> ShardedPageTable:
        """A new coordinator for the running, detached shard actors of ``config``.

        The mirror is rebuilt from the shards at the newest epoch every shard can present:
        shards one epoch ahead (a commit the old coordinator never finished) step back.
        """
        config = TableConfig.resolve(config, **overrides)
        if config.backend != "ray" or not config.ray.detached:
            raise ValueError("attach needs backend: ray with ray.detached: true")
        return cls(*config.shape(), _defaults=config.defaults(), _attach=True)

    # -- state -----------------------------------------------------------------------------

    def __getitem__(self, group: int) -> GroupView:
        return self._views[group]

    def __len__(self) -> int:
        return len(self._views)

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    @property
    def num_groups(self) -> int:
        return len(self._views)

    @property
    def epoch(self) -> int:
        """The last confirmed epoch (every shard it touched confirmed it; the others hold
        an older one with rows it did not change)."""
        return self._committer.epoch

    @property
    def generation(self) -> int:
        """This coordinator's generation (the shards obey exactly one)."""
        return self._committer.generation

    @property
    def recover_mode(self) -> str:
        return self._health.mode

    @property
    def max_recoveries(self) -> int:
        return self._health.max_recoveries

    @property
    def wire_limits(self) -> WireLimits:
        """What a shard accepts; every epoch is checked against it before it is sent."""
        return self._committer.wire_limits

    @property
    def _hosts(self) -> list[HostRows]:
        return self._mirror.hosts

    def _check_open(self) -> None:
        if self._shards.closed:
            raise RuntimeError("this ShardedPageTable is closed")

    # -- row operations (the mirror only) ------------------------------------------------

    append_row = _row_op("append_row")
    add_row = _row_op("add_row")
    clear_row = _row_op("clear_row")
    move_row = _row_op("move_row")
    swap_row = _row_op("swap_row")
    append_rows_batch = _row_op("append_rows_batch")

    @_locked
    def compute_slot_mapping(self, group: int, req_indices: object, positions: object):
        """``i32[max_num_batched_tokens]`` slots of the scheduled tokens in ``group``, from
        the mirror (see :mod:`sharded_pagetable.table.slot_mapping`)."""
        return self._mirror.compute_slot_mapping(group, req_indices, positions)

    # -- commits -------------------------------------------------------------------------

    def commit(
        self,
        num_reqs: int,
        num_scheduled_tokens: object = None,
        num_computed_tokens: object = None,
        *,
        wait: bool = True,
    ) -> CommitReceipt:
        """Publish rows ``[0, num_reqs)`` as one new epoch; returns a receipt (the epoch; per
        shard it touched, the rows and bytes sent and the checksum it confirmed; the KV
        copies the model step must make). Only the shards the epoch touches (a changed row,
        a part of the schedule other than the one they hold, KV copies) are sent a message
        and waited on; nothing to send is no epoch.

        With ``num_scheduled_tokens`` and ``num_computed_tokens`` (one int per row below
        ``num_reqs``) the epoch also carries the step's schedule: every shard builds the
        step's inputs (:meth:`step_snapshot`) on its own devices. A schedule that does not
        fit, or an epoch larger than a shard accepts, is refused before anything is sent. If
        any shard fails, every shard steps back, nothing is published, the mirror keeps the
        pending changes, and :class:`ShardFailedError` names the shard; with
        ``recover="auto"`` a lost shard is replaced and the commit retried.

        With ``wait=False`` it returns as soon as every shard's message is on its way (the
        receipt's ``confirmed`` is False); :meth:`wait` returns the confirmed receipt. The
        next commit, every read, ``recover()`` and ``close()`` settle it first: if it
        failed, that call raises :class:`ShardFailedError` naming it, and neither it nor a
        later epoch is published. Row operations do not wait for it.
        """
        n = check_count(num_reqs, self.max_num_reqs, "num_reqs")
        with self._lock:
            self._started()
            self._settle()
            schedule = self._mirror.schedule(n, num_scheduled_tokens, num_computed_tokens)

            def attempt() -> CommitReceipt:  # staged again after a recovery
                started = time.perf_counter()
                return self._send(self._committer.stage(n, schedule), n, wait, started)

            return self._health.call(attempt, self.recover)

    def send(self, plan: EpochPlan | None, *, wait: bool = True) -> CommitReceipt:
        """Send an epoch from :meth:`stage` as :meth:`commit` would (``commit`` is
        ``send(stage(...))``). A plan staged before a later row change, commit or recovery is
        refused with ``ValueError``; a ``None`` plan commits nothing. The seam tools and
        benchmarks measure the commit through; a failure fails the table as a commit does."""
        with self._lock:
            self._started()
            self._settle()
            if plan is not None:
                self._committer.check_current(plan)
            num_reqs = 0 if plan is None else plan.num_reqs
            return self._health.call(lambda: self._send(plan, num_reqs, wait), self.recover)

    def _send(
        self, plan: EpochPlan | None, num_reqs: int, wait: bool, started: float | None = None
    ) -> CommitReceipt:
        backend, committer = self._started(), self._committer
        receipt = committer.send(backend, plan, num_reqs, started)
        return receipt if not wait else committer.settle(backend) or receipt

    def stage(
        self,
        num_reqs: int,
        num_scheduled_tokens: object = None,
        num_computed_tokens: object = None,
    ) -> EpochPlan | None:
        """The epoch :meth:`commit` would send now, without sending or changing anything:
        per shard the batch (changed rows, schedule, KV copies). None if nothing would
        change. For tools and benchmarks that measure or inspect the commit path."""
        n = check_count(num_reqs, self.max_num_reqs, "num_reqs")
        with self._lock:
            self._started()  # a plan carries the generation the shards are fenced with
            self._settle()
            schedule = self._mirror.schedule(n, num_scheduled_tokens, num_computed_tokens)
            return self._committer.stage(n, schedule)

    @_locked
    def wait(self) -> CommitReceipt | None:
        """The confirmed receipt of the last ``commit(..., wait=False)`` (None if nothing is
        in flight); raises :class:`ShardFailedError` if that epoch failed."""
        self._check_open()
        if not self._shards.started:  # nothing was ever sent
            return None
        backend = self._started()
        return self._health.watch(lambda: self._committer.settle(backend))

    def _settle(self) -> None:
        if self._committer.in_flight:
            backend = self._started()
            self._health.watch(lambda: self._committer.settle(backend))

    # -- reads that reach the shards ---------------------------------------------------

    def _read(self, fn: Callable[[Backend], Any]) -> Any:
        """A read on the shards (started first if need be: a failed start raises as it is);
        a lost shard fails the table closed."""
        with self._lock:
            backend = self._started()
            self._settle()
            return self._health.call(lambda: fn(backend), self.recover)

    @_locked  # a commit in another thread would donate the buffers under us
    def _group_array(self, group: int) -> jax.Array:
        backend = self._started()
        self._health.check()
        return backend.group_array(group)

    def device_snapshot(self, group: int) -> np.ndarray:
        """``i32[max_num_reqs, P]`` numpy copy of group ``group``'s committed device table
        (the shape of ``get_cpu_tensor()``; the device arrays hold ``layout.max_num_reqs``
        rows, the capacity rounded up to split over the row axis, whose extra rows are
        always padding)."""
        group = check_index(group, len(self._views), "group")
        snap = self._read(lambda backend: backend.device_snapshot(group))
        return snap if snap.shape[0] == self.max_num_reqs else snap[: self.max_num_reqs].copy()

    def step_snapshot(self) -> StepInputs:
        """Numpy copies of the last epoch's step inputs, gathered from every shard: token
        rows, positions and per-group slot mapping ``i32[T]``, kv lens ``i32[R]``, and
        ``cu_q_lens`` ``i32[S, R/S + 1]`` (shard ``s``'s tokens fill ``[s*T/S, (s+1)*T/S)``).
        Raises if that epoch carried no schedule."""
        return gather_step_inputs(self._read(lambda backend: backend.step_snapshot()))

    def run_on_shards(self, fn: Callable[..., Any], *args: Any, step: bool = False) -> list[Any]:
        """Run ``fn(list_of_group_arrays, *args)`` in every shard process at once.

        The arrays are the committed global arrays (each process sees its addressable part),
        so a jitted function over them is an SPMD program across the shard processes. ``fn``
        is trusted driver code, run with the shard process's privileges; if it raises,
        :class:`RunOnShardsError` names the shard and the table stays healthy. With
        ``step=True`` it is called ``fn(arrays, step, *args)``: ``step`` is a
        :class:`~sharded_pagetable.shard.step.ShardStep` holding the epoch's step inputs as
        global arrays and the KV copies the model step owes before attention.
        """
        return self._read(lambda backend: backend.run_on_shards(fn, *args, step=step))

    def shard_status(self) -> list[tuple[int, int]]:
        """``(epoch, checksum)`` each shard reports now. A commit reaches only the shards it
        touches, so a healthy shard holds the epoch that last touched it (at most
        ``t.epoch``) and the checksum its last receipt gave; the coordinator checks exactly
        that pair per shard when it recovers or attaches."""
        return self._read(lambda backend: [(a.epoch, a.checksum) for a in backend.status()])

    # -- recovery --------------------------------------------------------------------------

    def recover(self) -> float:
        """Bring the table back at the last published epoch.

        Shards whose process died get new processes; those, and any shard that does not
        hold what the mirror published, are re-seeded from the mirror's published rows and
        verified by checksum. With ``ray.survivable`` only the dead shards are replaced and
        the others keep their processes, device buffers and whatever the model step keeps
        in them; otherwise (and when the process hosting JAX's service died) every shard is
        replaced. ``lost_kv_rows`` then names the live rows whose KV the scheduler must
        recompute: those of the replaced shards, and rows of other shards whose KV was still
        to be copied from a replaced shard's pool (a migration whose source died). Pending changes stay pending for the next commit.
        Returns the seconds it took; raises :class:`ShardFailedError` if a shard fails
        again (``lost_kv_rows`` then names every live row).
        """
        with self._lock:
            backend = self._started()
            with contextlib.suppress(ShardFailedError):
                self._settle()  # a failure it finds is what is being recovered
            health = self._health
            if health.fenced is not None:
                raise health.fenced  # the shards belong to a newer coordinator
            t0 = time.perf_counter()
            self.lost_kv_rows = self._mirror.live_rows()  # until it is known which survived
            fresh, orphans = health.watch(lambda: self._committer.rebuild(backend))
            self.lost_kv_rows = np.union1d(self._mirror.live_rows(fresh), orphans).astype(np.int32)
            health.recovered()
            seconds = time.perf_counter() - t0
            self.recoveries.append(seconds)
            if self.metrics is not None:
                self.metrics.recovered()
            log.warning(
                "recovered at epoch %d in %.2fs; shards %s got new processes",
                self.epoch,
                seconds,
                fresh,
            )
            return seconds

    # -- whole-table operations ----------------------------------------------------------

    @_locked
    def clear(self) -> None:
        """Empty every row of every group, on the host and on every shard's devices."""
        self._check_open()
        if not self._shards.started:  # nothing was ever published: the host is all there is
            self._mirror.reset()
            return
        self._health.check()
        self._mirror.reset()
        self.commit(self.max_num_reqs)

    def close(self, stop_shards: bool | None = None) -> None:
        """Release the shards (actors and devices). Safe to call twice.

        Only the coordinator that started the shards stops them (``stop_shards=None``); one
        that attached to running shards, or that a newer one took over, lets go of them and
        leaves them running. ``stop_shards=True`` stops shards this coordinator attached to
        (a detached table's final shutdown); ``False`` leaves even its own running.
        """
        with self._lock:
            if self._shards.started:
                with contextlib.suppress(ShardFailedError, FencedError):
                    self._settle()
            backend = self._shards.close()
            if backend is None:  # never started, or closed before
                return
            stop = backend.started_shards if stop_shards is None else stop_shards
            if self._health.fenced is not None or not stop:
                backend.detach()
            else:
                backend.close(clean=self._health.failed is None)

    def __enter__(self) -> ShardedPageTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
