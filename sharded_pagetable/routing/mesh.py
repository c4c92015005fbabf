"""Device meshes whose row axis is ordered by process, built the same way in every process."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

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


def shards_per_device(mesh: Mesh, row_axis: str, num_shards: int) -> int:
    """How many shards each device of ``row_axis`` holds rows of: 1 when every shard has
    devices of its own (``num_shards`` divides the axis), ``k`` when ``k`` shards share each
    device (``num_shards = k x`` the axis; in-process shards only)."""
    size = mesh.shape[row_axis]
    if num_shards >= 1 and not size % num_shards:
        return 1
    if num_shards >= 1 and not num_shards % size:
        return num_shards // size
    raise ValueError(
        f"num_shards={num_shards} must divide the {size} devices of row axis {row_axis!r} "
        "or be a multiple of them"
    )


def shard_submesh(mesh: Mesh, row_axis: str, num_shards: int, shard: int) -> Mesh:
    """The part of ``mesh`` that holds shard ``shard``'s rows: its consecutive devices along
    ``row_axis`` (``size // num_shards`` of them, or the one device it shares with other
    shards), every other axis whole, same axis names. A shard computes on it without
    touching another shard's devices."""
    size = mesh.shape[row_axis]
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is out of range for {num_shards} shards")
    shared = shards_per_device(mesh, row_axis, num_shards)
    per = 1 if shared > 1 else size // num_shards
    first = shard // shared if shared > 1 else shard * per
    axis = mesh.axis_names.index(row_axis)
    devices = np.take(mesh.devices, range(first, first + per), axis=axis)
    return Mesh(devices, mesh.axis_names)


@dataclass(frozen=True)
class RowBlock:
    """Rows ``[lo, hi)`` of a ``[R, P]`` table, whole on each of ``devices``: the part of
    the table a shard that shares its devices with other shards keeps in buffers of its
    own. It answers the one question :class:`~sharded_pagetable.rows.device.DeviceRows`
    asks of a sharding (which rows each device holds); the table's global array is
    assembled from the buffers of every shard on a device when it is read."""

    devices: tuple[jax.Device, ...]
    lo: int
    hi: int

    def addressable_devices_indices_map(self, shape: tuple[int, ...]) -> dict:
        rows = slice(self.lo, self.hi)
        return {d: (rows, slice(0, shape[1])) for d in self.devices}


def shard_rows_sharding(
    sharding: NamedSharding, layout: ShardLayout, shard: int
) -> NamedSharding | RowBlock:
    """Where shard ``shard`` keeps its rows: the table's row ``sharding`` when the shard
    owns whole device blocks, else a :class:`RowBlock` of its rows on the devices of the
    block it shares (every replica along the other mesh axes)."""
    if layout.shards_per_block == 1:
        return sharding
    mesh, row_axis = sharding.mesh, sharding.spec[0]
    sub = shard_submesh(mesh, row_axis, layout.num_shards, shard)
    rows = layout.shard_rows(shard)
    return RowBlock(tuple(sub.devices.flat), rows.start, rows.stop)


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
        for other in layout.shards_of_block(block):  # shards sharing it share its process
            if shard_process[other] != want:
                raise ValueError(
                    f"mesh refused: row block {block} holds rows of shards {shard} and "
                    f"{other}, in processes {want} and {shard_process[other]}"
                )
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
