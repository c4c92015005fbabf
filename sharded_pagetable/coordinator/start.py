"""Where the shards live: the one place that tells the backends apart."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from ..config import RayOptions, check_table_shape
from ..routing.layout import ShardLayout, check_shard_count
from ..routing.mesh import build_mesh, ordered_devices, row_sharding
from ..routing.pools import PagePools
from ..shard.shard import ShardSpec
from ..shard.step import StepConfig
from ..table.validation import check_count
from .backend import Backend
from .local import LocalBackend


def check_args(
    shape: tuple[int, int, int, tuple[int, ...]], num_shards: int, backend: str | Backend
) -> None:
    """Refuse constructor arguments of ``ShardedPageTable`` that no backend could serve:
    ``shape`` is ``(max_num_reqs, max_model_len, max_num_batched_tokens, page_sizes)``."""
    names = ("max_num_reqs", "max_model_len", "max_num_batched_tokens")
    for name, value in zip(names, shape, strict=False):
        if check_count(value, 2**31 - 1, name) < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if isinstance(backend, str) and backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    check_count(num_shards, 2**31 - 1, "num_shards")
    check_table_shape(shape[0], shape[1], shape[3], num_shards)


def check_pool_pages(num_pages: int | None, pools: PagePools) -> int:
    """``num_pages`` of a table with page pools: every pool's pages, and no other."""
    if num_pages is not None and num_pages != pools.num_pages:
        raise ValueError(
            f"num_pages={num_pages} disagrees with pages_per_shard={pools.pages_per_shard} x "
            f"{pools.num_shards} shards = {pools.num_pages} page ids; give one of them"
        )
    return pools.num_pages


def step_config(
    page_sizes: tuple[int, ...], max_num_batched_tokens: int, layout: ShardLayout
) -> StepConfig | None:
    """How the shards build step inputs: each shard gets ``max_num_batched_tokens //
    num_shards`` token slots, split evenly over its devices (None when they do not split:
    such a table refuses schedules)."""
    tokens = max_num_batched_tokens // layout.num_shards
    if tokens < layout.blocks_per_shard or tokens % layout.blocks_per_shard:
        return None
    return StepConfig(page_sizes, tokens)


@dataclass(frozen=True)
class ShardShape:
    """What every shard of a table is built from, whatever the backend.

    Args:
      max_num_reqs: rows of the whole table (as requested; the layout may round it up).
      num_shards: shards the rows split over.
      widths: pages per row of each group.
      page_sizes: tokens per page of each group.
      max_num_batched_tokens: the per-step token budget (step inputs).
      warmup: compile device updates and kernels at start-up.
    """

    max_num_reqs: int
    num_shards: int
    widths: tuple[int, ...]
    page_sizes: tuple[int, ...]
    max_num_batched_tokens: int
    warmup: bool = True

    def specs(self, layout: ShardLayout) -> list[ShardSpec]:
        step = step_config(self.page_sizes, self.max_num_batched_tokens, layout)
        return [
            ShardSpec(s, layout, self.widths, self.warmup, step) for s in range(self.num_shards)
        ]


@dataclass(frozen=True)
class ShardPlan:
    """Where a table's shards will live, decided without starting any: the layout, the
    mesh's axis sizes, and how to start them (``start()`` returns a started backend; the
    table calls it when it first needs its shards)."""

    layout: ShardLayout
    mesh_axes: dict[str, int]
    start: Callable[[], Backend]


def mesh_devices(sharding: jax.sharding.Sharding | None) -> list[jax.Device] | None:
    """The devices a caller's ``sharding`` (``MultiGroupPageTable``'s argument) names, in
    (process, id) order; None for none."""
    return None if sharding is None else ordered_devices(list(sharding.device_set))


def plan_backend(
    kind: str | Backend,
    shape: ShardShape,
    mesh: Mesh | Mapping[str, int] | None,
    row_axis: str,
    ray: RayOptions | Mapping[str, Any] | None,
    attach: bool = False,
    sharding: jax.sharding.Sharding | None = None,
) -> ShardPlan:
    """Where the shards live: the one place that tells the backends apart. ``kind`` is
    ``"local"``, ``"ray"``, or a started backend (with ``layout`` and ``mesh_axes``).

    The row capacity is ``max_num_reqs`` rounded up to split over the row axis and the
    shards (:meth:`ShardLayout.fit`). In-process shards take their mesh from ``mesh`` (a
    ``Mesh`` as is; axis sizes, or None for 1-D over ``row_axis``, built over the devices of
    ``sharding`` if given, else over every device); several may share a device. A Ray shard
    process needs devices of its own and builds its mesh itself (``sharding`` names the
    driver's devices and is not used)."""
    if not isinstance(kind, str):
        if kind.layout.num_shards != shape.num_shards:
            raise ValueError(
                f"the backend has {kind.layout.num_shards} shards, the table {shape.num_shards}"
            )
        return ShardPlan(kind.layout, dict(kind.mesh_axes), lambda: kind)
    rows, shards = shape.max_num_reqs, shape.num_shards
    if kind == "local":
        if isinstance(sharding, NamedSharding) and mesh is None and row_axis in sharding.mesh.shape:
            mesh = sharding.mesh  # rows over its row axis, replicated over its others
        if mesh is None or isinstance(mesh, Mapping):
            mesh = build_mesh(mesh, row_axis, mesh_devices(sharding))
        if row_axis not in mesh.shape:
            raise ValueError(f"row_axis {row_axis!r} is not an axis of the mesh {dict(mesh.shape)}")
        layout = ShardLayout.fit(rows, shards, mesh.shape[row_axis])
        specs, rows_sharding = shape.specs(layout), row_sharding(mesh, row_axis)
        return ShardPlan(layout, dict(mesh.shape), lambda: LocalBackend(specs, rows_sharding))
    options = RayOptions.from_value(ray)
    if isinstance(mesh, Mesh):
        raise ValueError(
            "backend='ray' builds its mesh inside the shard processes: pass mesh as a "
            "mapping of axis sizes such as {'data': 8}, not a Mesh"
        )
    axes = dict(mesh) if mesh else {row_axis: shards * options.devices_per_shard}
    if row_axis not in axes:
        raise ValueError(f"row_axis {row_axis!r} is not an axis of the mesh {axes}")
    check_shard_count(shards, axes[row_axis], share=False)
    layout = ShardLayout.fit(rows, shards, axes[row_axis])
    specs = shape.specs(layout)

    def start() -> Backend:
        from ray_actors.backend import RayBackend  # Ray loads only when a table needs it

        return RayBackend(specs, axes, row_axis, options, attach=attach)

    return ShardPlan(layout, axes, start)
