"""Device meshes whose row axis is ordered by process, built the same way in every process."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .layout import ShardLayout

SHARD_AXIS = "_shard"
LOCAL_AXIS = "_local"
ROWS = PartitionSpec((SHARD_AXIS, LOCAL_AXIS))  # an axis split over every device of the row axis


def ordered_devices(devices: list[jax.Device] | None = None) -> list[jax.Device]:
    """``devices`` (default: all) sorted by (process, id): process 0's devices come first."""
    devices = jax.devices() if devices is None else devices
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def build_mesh(axes: Mapping[str, int] | None = None, row_axis: str = "data", devices=None) -> Mesh:
    """A mesh over ``devices`` with named ``axes`` (default: 1-D ``{row_axis: all devices}``).

    Devices are laid out in (process, id) order with the first axis outermost, so when the
    row axis comes first each process holds a contiguous run of row blocks.
    """
    devs = ordered_devices(devices)
    axes = {row_axis: len(devs)} if not axes else dict(axes)
    if row_axis not in axes:
        raise ValueError(f"row_axis {row_axis!r} is not an axis of the mesh {axes}")
    size = int(np.prod(list(axes.values())))
    if size != len(devs):
        raise ValueError(f"mesh axes {axes} need {size} devices, but {len(devs)} are available")
    return Mesh(np.array(devs, dtype=object).reshape(tuple(axes.values())), tuple(axes))


def row_sharding(mesh: Mesh, row_axis: str) -> NamedSharding:
    """Rows split over ``row_axis``, pages whole, other mesh axes replicated."""
    if row_axis not in mesh.axis_names:
        raise ValueError(f"row_axis {row_axis!r} is not an axis of mesh {dict(mesh.shape)}")
    return NamedSharding(mesh, PartitionSpec(row_axis, None))


def shard_submesh(mesh: Mesh, row_axis: str, num_shards: int, shard: int) -> Mesh:
    """The part of ``mesh`` that holds shard ``shard``'s rows: its consecutive devices along
    ``row_axis`` (``size // num_shards`` of them), every other axis whole, same axis names.
    A shard process computes on it without touching another shard's devices."""
    size = mesh.shape[row_axis]
    if num_shards < 1 or size % num_shards or not 0 <= shard < num_shards:
        raise ValueError(
            f"shard {shard} of {num_shards} does not tile the {size} devices of {row_axis!r}"
        )
    per = size // num_shards
    axis = mesh.axis_names.index(row_axis)
    devices = np.take(mesh.devices, range(shard * per, (shard + 1) * per), axis=axis)
    return Mesh(devices, mesh.axis_names)


def check_ownership(
    mesh: Mesh, row_axis: str, layout: ShardLayout, shard_process: Mapping[int, int]
) -> None:
    """Refuse a mesh on which a shard's rows would live on another process's devices.

    ``shard_process`` maps shard index -> JAX process index that hosts it.
    """
    axis = mesh.axis_names.index(row_axis)
    devs = np.moveaxis(mesh.devices, axis, 0).reshape(layout.num_blocks, -1)  # [block, replica]
    for block in range(layout.num_blocks):
        shard = layout.shard_of_block(block)
        want = shard_process[shard]
        for device in devs[block]:
            if device.process_index != want:
                raise ValueError(
                    f"mesh refused: row block {block} (rows "
                    f"{block * layout.rows_per_block}..{(block + 1) * layout.rows_per_block - 1}) "
                    f"belongs to shard {shard} in process {want}, but device {device} is in "
                    f"process {device.process_index}; order the row axis by process"
                )


@functools.lru_cache(maxsize=64)
def shard_mesh(mesh: Mesh, row_axis: str, num_shards: int) -> Mesh:
    """``mesh`` with ``row_axis`` split into ``("_shard" S, "_local" D)``: same devices in the
    same order, other axes kept. Shard ``s``'s devices are the ``D`` consecutive devices
    ``[s*D, (s+1)*D)`` along the row axis."""
    if row_axis not in mesh.axis_names:
        raise ValueError(f"row_axis {row_axis!r} is not an axis of mesh {dict(mesh.shape)}")
    for name in (SHARD_AXIS, LOCAL_AXIS):
        if name in mesh.axis_names:
            raise ValueError(f"mesh {dict(mesh.shape)} already has an axis named {name!r}")
    size = mesh.shape[row_axis]
    if num_shards < 1 or size % num_shards:
        raise ValueError(
            f"num_shards={num_shards} must be positive and divide the {size} devices of "
            f"row axis {row_axis!r}"
        )
    axis = mesh.axis_names.index(row_axis)
    shape = list(mesh.devices.shape)
    shape[axis : axis + 1] = [num_shards, size // num_shards]
    names = list(mesh.axis_names)
    names[axis : axis + 1] = [SHARD_AXIS, LOCAL_AXIS]
    return Mesh(mesh.devices.reshape(shape), tuple(names))
