"""Frozen configs that YAML files in ``configs/`` map onto one to one.

A YAML file looks like::

    max_num_reqs: 1024
    max_model_len: 32768
    max_num_batched_tokens: 8192
    page_sizes: [16, 64]
    num_shards: 4
    backend: ray            # or local
    row_axis: data
    mesh: {data: 8}         # optional; default 1-D over every device
    pages_per_shard: 4096   # optional: KV-local page pools (shard s owns [s*P, (s+1)*P))
    ray:
      address: null         # null: start a local Ray bound to 127.0.0.1
      devices_per_shard: 2
      timeout_s: 60
      placement: pack       # or spread (STRICT_SPREAD: one shard per node)

A default config for the tables an engine builds (:class:`TableDefaults`, see
:mod:`.defaults`) has the same keys without the first four (the table's shape).

Unknown keys and bad values raise :class:`ConfigError` naming the key; every number is
range-checked against what int32 tables and JAX meshes allow. The YAML is plain data: anchors,
aliases, merge keys, duplicate keys and YAML-1.1-only forms (octal ``040``, ``1_000``, ``yes``)
are refused (naming the key and line), as are files over 64 KiB, non-UTF-8 text and syntax
errors (:mod:`.yaml_loader`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .constants import cdiv
from .errors import ConfigError
from .routing.layout import check_shard_count
from .yaml_loader import key_name, load_yaml, show

_PLACEMENTS = ("pack", "spread")
_PLATFORMS = ("cpu", "gpu")
_RECOVER = ("manual", "auto")
_CHANNELS = ("socket", "actor", "compiled")

MAX_INT32 = 2**31 - 1  # rows, lengths, token counts and table entries are int32
MAX_DEVICES = 4096  # devices in one mesh, and so shards and devices per shard
MAX_MESH_AXES = 16
MAX_GROUPS = 64  # page sizes, one device table each
MAX_RECOVERIES = 1000  # the coordinator's own bound
MIN_TIMEOUT_S = 0.001  # 1 ms, under one Ray call's round trip: a shorter one fails every call
MAX_TIMEOUT_S = 86400.0  # one day: a longer call timeout is a typo, not a plan
MIN_CPUS_PER_SHARD = 0.0001  # Ray's resource precision: Ray refuses a smaller nonzero share
MAX_CPUS_PER_SHARD = 1024.0


def _int_in(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{key} must be an integer in {lo}..{hi}, got {show(value)}")
    return value


def check_table_shape(
    max_num_reqs: int, max_model_len: int, page_sizes: Sequence[int], num_shards: int
) -> None:
    """What every path that builds a sharded table checks of its shape (``TableConfig`` and
    the constructor alike): every shard holds a row, and every group's table is indexable
    with int32. Raises :class:`ConfigError` (a ``ValueError``) naming the value."""
    if num_shards > max_num_reqs:
        raise ConfigError(
            f"num_shards must be at most max_num_reqs={max_num_reqs} (a shard holds at "
            f"least one row), got {num_shards}"
        )
    for g, size in enumerate(page_sizes):
        entries = max_num_reqs * cdiv(max_model_len, size)
        if entries > MAX_INT32:
            raise ConfigError(
                f"page_sizes[{g}]={size}: max_num_reqs x pages per row = "
                f"{max_num_reqs} x {cdiv(max_model_len, size)} = {entries} table "
                f"entries, more than {MAX_INT32} (int32 indexing); use fewer rows, a "
                f"shorter max_model_len or larger pages"
            )


def _positive_int(key: str, value: Any, hi: int = MAX_INT32) -> int:
    return _int_in(key, value, 1, hi)


def _number_in(key: str, value: Any, lo: float, hi: float, *, or_zero: bool = False) -> float:
    """A finite int or float in ``[lo, hi]`` (or exactly 0 with ``or_zero``); NaN fails
    every comparison, infinities the bounds."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and ((lo <= value <= hi) or (or_zero and value == 0))
    )
    if not ok:
        where = f"0 or [{lo:g}, {hi:g}]" if or_zero else f"[{lo:g}, {hi:g}]"
        raise ConfigError(f"{key} must be a finite number in {where}, got {show(value)}")
    return value


def _check_keys(where: str, data: Mapping[str, Any], cls: type) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in known), key=show)
    if unknown:
        prefix = f"{where}." if where != "config" else ""
        raise ConfigError(
            f"unknown config key {prefix}{key_name(unknown[0])}; known keys: {sorted(known)}"
        )


@dataclass(frozen=True)
class RayOptions:
    """Options of ``backend="ray"``.

    Args:
      address: Ray cluster address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``);
        None starts a local Ray bound to 127.0.0.1.
      devices_per_shard: JAX devices in each shard process (CPU devices on CPU).
      platform: ``"cpu"`` or ``"gpu"`` (GPUs are requested through Ray's ``num_gpus``).
      timeout_s: a shard that does not answer a call within this many seconds has failed.
      placement: ``"pack"`` (anywhere) or ``"spread"`` (one shard per node, STRICT_SPREAD).
      namespace: Ray namespace of the shard actors.
      cpus_per_shard: CPUs reserved per shard actor (0 lets several share a small machine).
      detached: name the shard actors and detach them from the driver, so a restarted
        coordinator can ``ShardedPageTable.attach`` to them.
      name: prefix of the actor names (``{name}-shard-{i}``) when detached.
      channel: how commit messages reach the shards: ``"socket"`` (default: one
        authenticated TCP stream per shard, opened at start-up), ``"actor"`` (ordinary Ray
        actor calls, 2-3 ms per fan-out on a 2-core machine) or ``"compiled"`` (a Ray
        compiled graph; its actors poll their channels, measured at 40-70% of a core each
        while idle, so only for machines with cores to spare).
      standby: keep a second, started and warmed set of shard processes (its own JAX job,
        idle in its actor loop, not polling) that a recovery re-seeds and switches to, then
        replaces in the background: recovery skips JAX start-up and warm-up. Costs the
        idle processes' memory; with ``placement: spread`` it needs twice the nodes.
      survivable: host JAX's coordination service in a process of its own (holding no
        shard) and turn JAX recoverability on in every process, so a recovery replaces
        only the shard processes that died; the others keep their tables, device buffers
        and whatever the model step keeps in them (KV). Not with ``standby``; with
        ``detached``, the service process is named too and outlives the driver.
    """

    address: str | None = None
    devices_per_shard: int = 2
    platform: str = "cpu"
    timeout_s: float = 60.0
    placement: str = "pack"
    namespace: str = "sharded_pagetable"
    cpus_per_shard: float = 0.0
    detached: bool = False
    name: str = "pagetable"
    channel: str = "socket"
    survivable: bool = False
    standby: bool = False

    def __post_init__(self) -> None:
        if self.address is not None and not isinstance(self.address, str):
            raise ConfigError(f"ray.address must be a string or null, got {show(self.address)}")
        _positive_int("ray.devices_per_shard", self.devices_per_shard, MAX_DEVICES)
        if self.platform not in _PLATFORMS:
            raise ConfigError(
                f"ray.platform must be one of {_PLATFORMS}, got {show(self.platform)}"
            )
        _number_in("ray.timeout_s", self.timeout_s, MIN_TIMEOUT_S, MAX_TIMEOUT_S)
        if self.placement not in _PLACEMENTS:
            raise ConfigError(
                f"ray.placement must be one of {_PLACEMENTS}, got {show(self.placement)}"
            )
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigError(
                f"ray.namespace must be a non-empty string, got {show(self.namespace)}"
            )
        _number_in(
            "ray.cpus_per_shard",
            self.cpus_per_shard,
            MIN_CPUS_PER_SHARD,
            MAX_CPUS_PER_SHARD,
            or_zero=True,
        )
        if not isinstance(self.detached, bool):
            raise ConfigError(f"ray.detached must be true or false, got {show(self.detached)}")
        if self.channel not in _CHANNELS:
            raise ConfigError(f"ray.channel must be one of {_CHANNELS}, got {show(self.channel)}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"ray.name must be a non-empty string, got {show(self.name)}")
        if not isinstance(self.standby, bool):
            raise ConfigError(f"ray.standby must be true or false, got {show(self.standby)}")
        if not isinstance(self.survivable, bool):
            raise ConfigError(f"ray.survivable must be true or false, got {show(self.survivable)}")
        if self.survivable and self.standby:
            raise ConfigError(
                "ray.survivable does not go with ray.standby: a survivable table replaces a "
                "dead shard alone (from a warm spare), a standby set replaces every shard; "
                "pick one"
            )
        if self.standby and self.detached:
            raise ConfigError(
                "ray.standby does not go with ray.detached: a standby set has no names to "
                "attach to; pick one"
            )

    @classmethod
    def from_value(cls, value: RayOptions | Mapping[str, Any] | None) -> RayOptions:
        if value is None:
            return cls()
        if isinstance(value, RayOptions):
            return value
        _check_keys("ray", value, cls)
        return cls(**value)


SHAPE_KEYS = ("max_num_reqs", "max_model_len", "max_num_batched_tokens", "page_sizes")


@dataclass(frozen=True)
class TableDefaults:
    """How a sharded table is sharded, without its shape: every key of a
    :class:`TableConfig` but the four the constructor's positional arguments give.

    ``ShardedPageTable`` takes each keyword it is not given from the default in effect
    (``sp.configure(...)``, else the file named by ``$SHARDED_PAGETABLE_CONFIG``, else
    ``TableDefaults()``: one in-process shard); see :mod:`sharded_pagetable.defaults`.

    Example::

      TableDefaults(num_shards=4, backend="ray", ray={"devices_per_shard": 1})
    """

    num_shards: int = 1
    backend: str = "local"
    row_axis: str = "data"
    mesh: Mapping[str, int] | None = None
    num_pages: int | None = None
    pages_per_shard: int | None = None
    metrics: bool = False
    warmup: bool = True
    recover: str = "manual"
    max_recoveries: int = 3
    ray: RayOptions = field(default_factory=RayOptions)

    def __post_init__(self) -> None:
        _positive_int("num_shards", self.num_shards, MAX_DEVICES)
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"backend must be 'local' or 'ray', got {show(self.backend)}")
        if not isinstance(self.row_axis, str) or not self.row_axis:
            raise ConfigError(f"row_axis must be a non-empty string, got {show(self.row_axis)}")
        if self.mesh is not None:
            self._check_mesh()
        if self.num_pages is not None:
            _positive_int("num_pages", self.num_pages, MAX_INT32 + 1)  # ids stay below it
        if self.pages_per_shard is not None:
            _positive_int(
                "pages_per_shard", self.pages_per_shard, (MAX_INT32 + 1) // self.num_shards
            )
        for key in ("warmup", "metrics"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {show(getattr(self, key))}")
        if self.recover not in _RECOVER:
            raise ConfigError(f"recover must be one of {_RECOVER}, got {show(self.recover)}")
        _positive_int("max_recoveries", self.max_recoveries, MAX_RECOVERIES)
        object.__setattr__(self, "ray", RayOptions.from_value(self.ray))
        if self.backend == "ray" and self.num_shards * self.ray.devices_per_shard > MAX_DEVICES:
            raise ConfigError(
                f"ray.devices_per_shard={self.ray.devices_per_shard} x num_shards="
                f"{self.num_shards} is more than {MAX_DEVICES} devices"
            )
        self._check_layout()

    def _check_mesh(self) -> None:
        mesh = self.mesh
        if not isinstance(mesh, Mapping) or not mesh or len(mesh) > MAX_MESH_AXES:
            raise ConfigError(
                f"mesh must be a mapping of 1..{MAX_MESH_AXES} axis sizes, got {show(mesh)}"
            )
        for name, size in mesh.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"mesh axis names must be non-empty strings, got {show(name)}")
            _positive_int(f"mesh.{key_name(name)}", size, MAX_DEVICES)
        if math.prod(mesh.values()) > MAX_DEVICES:
            raise ConfigError(
                f"mesh {show(dict(mesh))} has {math.prod(mesh.values())} devices, more than "
                f"{MAX_DEVICES}"
            )
        if self.row_axis not in mesh:
            raise ConfigError(
                f"row_axis {show(self.row_axis)} is not an axis of mesh {show(dict(mesh))}"
            )

    def _check_layout(self) -> None:
        """The shards must fit the row axis when the config alone fixes its size (the local
        backend without a mesh takes the devices of the process it starts in). Any row
        count fits: the table rounds its capacity up (``ShardLayout.fit``)."""
        if self.mesh is None:
            return
        try:
            check_shard_count(
                self.num_shards, self.mesh[self.row_axis], share=self.backend == "local"
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ShardedPageTable`` for these defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def merged(self, **given: Any) -> dict[str, Any]:
        """Every keyword of ``ShardedPageTable``: the ``given`` ones that are not None, these
        defaults for the rest. (Given values are not checked here: they may be objects a
        config cannot hold, such as a ``Mesh``; the constructor checks them.)"""
        out = self.kwargs()
        unknown = set(given) - set(out)
        if unknown:
            raise TypeError(f"unknown table settings {sorted(unknown)}")
        out.update({k: v for k, v in given.items() if v is not None})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> TableDefaults:
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        merged = {**data, **overrides}
        shape = [k for k in SHAPE_KEYS if k in merged]
        if shape:
            raise ConfigError(
                f"{shape[0]} is not a default: a table's shape comes from its constructor's "
                "arguments; a default config holds only how tables are sharded (num_shards, "
                "backend, mesh, ray, ...)"
            )
        _check_keys("config", merged, cls)
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> TableDefaults:
        data = load_yaml(path)
        return cls.from_dict({} if data is None else data, **overrides)


@dataclass(frozen=True)
class TableConfig:
    """Everything ``ShardedPageTable`` takes, as read from YAML: the table's shape and its
    :class:`TableDefaults` (flat, one key per field)."""

    max_num_reqs: int
    max_model_len: int
    max_num_batched_tokens: int
    page_sizes: tuple[int, ...]
    num_shards: int = 1
    backend: str = "local"
    row_axis: str = "data"
    mesh: Mapping[str, int] | None = None
    num_pages: int | None = None
    pages_per_shard: int | None = None
    metrics: bool = False
    warmup: bool = True
    recover: str = "manual"
    max_recoveries: int = 3
    ray: RayOptions = field(default_factory=RayOptions)

    def __post_init__(self) -> None:
        for key in ("max_num_reqs", "max_model_len", "max_num_batched_tokens"):
            _positive_int(key, getattr(self, key))
        _positive_int("num_shards", self.num_shards, MAX_DEVICES)
        self._check_page_sizes()
        check_table_shape(self.max_num_reqs, self.max_model_len, self.page_sizes, self.num_shards)
        object.__setattr__(self, "ray", self.defaults().ray)  # checks every other key

    def _check_page_sizes(self) -> None:
        sizes = self.page_sizes
        if not isinstance(sizes, tuple | list) or not sizes or len(sizes) > MAX_GROUPS:
            raise ConfigError(
                f"page_sizes must be a list of 1..{MAX_GROUPS} page sizes, got {show(sizes)}"
            )
        for g, size in enumerate(sizes):
            _positive_int(f"page_sizes[{g}]", size)
        object.__setattr__(self, "page_sizes", tuple(sizes))

    def defaults(self) -> TableDefaults:
        """Everything of this config but the shape."""
        return TableDefaults(**{f.name: getattr(self, f.name) for f in _DEFAULT_FIELDS})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> TableConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        merged = {**data, **overrides}
        _check_keys("config", merged, cls)
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in merged
        ]
        if required:
            raise ConfigError(f"missing config key {required[0]}")
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> TableConfig:
        data = load_yaml(path)
        if data is None:
            raise ConfigError(f"config file {path} is empty")
        return cls.from_dict(data, **overrides)

    @classmethod
    def resolve(cls, config: TableConfig | str, **overrides: Any) -> TableConfig:
        """``config`` itself, a YAML file's config, or either with ``overrides`` applied."""
        if isinstance(config, str):
            return cls.from_yaml(config, **overrides)
        return cls.from_dict({**config.__dict__, **overrides}) if overrides else config

    def shape(self) -> tuple[int, int, int, tuple[int, ...]]:
        """The positional arguments of ``ShardedPageTable`` for this config."""
        return self.max_num_reqs, self.max_model_len, self.max_num_batched_tokens, self.page_sizes

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ShardedPageTable`` for this config."""
        return self.defaults().kwargs()


_DEFAULT_FIELDS = dataclasses.fields(TableDefaults)
