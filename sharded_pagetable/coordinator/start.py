"""Where the shards live: the one place that tells the backends apart."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh

from ..config import RayOptions
from ..routing.layout import ShardLayout
from ..routing.mesh import build_mesh, row_sharding
from ..routing.pools import PagePools
from ..shard.shard import ShardSpec
from ..shard.step import StepConfig
from ..table.validation import check_count
from .backend import Backend
from .local import LocalBackend


def check_args(
    *,
    max_num_reqs: int,
    max_model_len: int,
    max_num_batched_tokens: int,
    num_shards: int,
    backend: str,
    recover: str,
    max_recoveries: int,
) -> None:
    """Refuse constructor arguments of ``ShardedPageTable`` that no backend could serve."""
    if recover not in ("manual", "auto"):
        raise ValueError(f"recover must be 'manual' or 'auto', got {recover!r}")
    if check_count(max_recoveries, 1000, "max_recoveries") < 1:
        raise ValueError(f"max_recoveries must be positive, got {max_recoveries}")
    for name, value in (
        ("max_num_reqs", max_num_reqs),
        ("max_model_len", max_model_len),
        ("max_num_batched_tokens", max_num_batched_tokens),
    ):
        if check_count(value, 2**31 - 1, name) < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    check_count(num_shards, 2**31 - 1, "num_shards")


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


def start_backend(
    kind: str,
    mesh: Mesh | Mapping[str, int] | None,
    *,
    row_axis: str,
    max_num_reqs: int,
    num_shards: int,
    widths: tuple[int, ...],
    page_sizes: tuple[int, ...],
    max_num_batched_tokens: int,
    warmup: bool,
    ray: RayOptions | Mapping[str, Any] | None,
    attach: bool,
) -> tuple[ShardLayout, dict[str, int], Backend]:
    """Where the shards live: the one place that tells the backends apart."""

    def specs(layout: ShardLayout) -> list[ShardSpec]:
        step = step_config(page_sizes, max_num_batched_tokens, layout)
        return [ShardSpec(s, layout, widths, warmup, step) for s in range(num_shards)]

    if kind == "local":
        if mesh is None or isinstance(mesh, Mapping):
            mesh = build_mesh(mesh, row_axis)
        layout = ShardLayout(max_num_reqs, num_shards, mesh.shape[row_axis])
        return layout, dict(mesh.shape), LocalBackend(specs(layout), row_sharding(mesh, row_axis))
    from ray_actors.backend import RayBackend

    options = RayOptions.from_value(ray)
    if isinstance(mesh, Mesh):
        raise ValueError(
            "backend='ray' builds its mesh inside the shard processes: pass mesh as a "
            "mapping of axis sizes such as {'data': 8}, not a Mesh"
        )
    axes = dict(mesh) if mesh else {row_axis: num_shards * options.devices_per_shard}
    if row_axis not in axes:
        raise ValueError(f"row_axis {row_axis!r} is not an axis of the mesh {axes}")
    layout = ShardLayout(max_num_reqs, num_shards, axes[row_axis])
    return layout, axes, RayBackend(specs(layout), axes, row_axis, options, attach=attach)
