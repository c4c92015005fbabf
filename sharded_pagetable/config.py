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
    ray:
      address: null         # null: start a local Ray bound to 127.0.0.1
      devices_per_shard: 2
      timeout_s: 60
      placement: pack       # or spread (STRICT_SPREAD: one shard per node)

Unknown keys and bad values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError

_PLACEMENTS = ("pack", "spread")
_PLATFORMS = ("cpu", "gpu")
_RECOVER = ("manual", "auto")
_CHANNELS = ("socket", "actor", "compiled")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _check_keys(where: str, data: Mapping[str, Any], cls: type) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        prefix = f"{where}." if where != "config" else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; known keys: {sorted(known)}")


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

    def __post_init__(self) -> None:
        if self.address is not None and not isinstance(self.address, str):
            raise ConfigError(f"ray.address must be a string or null, got {self.address!r}")
        _positive_int("ray.devices_per_shard", self.devices_per_shard)
        if self.platform not in _PLATFORMS:
            raise ConfigError(f"ray.platform must be one of {_PLATFORMS}, got {self.platform!r}")
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, int | float)
            or (self.timeout_s <= 0)
        ):
            raise ConfigError(f"ray.timeout_s must be a positive number, got {self.timeout_s!r}")
        if self.placement not in _PLACEMENTS:
            raise ConfigError(f"ray.placement must be one of {_PLACEMENTS}, got {self.placement!r}")
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigError(f"ray.namespace must be a non-empty string, got {self.namespace!r}")
        if (
            isinstance(self.cpus_per_shard, bool)
            or not isinstance(self.cpus_per_shard, int | float)
            or self.cpus_per_shard < 0
        ):
            raise ConfigError(f"ray.cpus_per_shard must be >= 0, got {self.cpus_per_shard!r}")
        if not isinstance(self.detached, bool):
            raise ConfigError(f"ray.detached must be true or false, got {self.detached!r}")
        if self.channel not in _CHANNELS:
            raise ConfigError(f"ray.channel must be one of {_CHANNELS}, got {self.channel!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"ray.name must be a non-empty string, got {self.name!r}")

    @classmethod
    def from_value(cls, value: RayOptions | Mapping[str, Any] | None) -> RayOptions:
        if value is None:
            return cls()
        if isinstance(value, RayOptions):
            return value
        _check_keys("ray", value, cls)
        return cls(**value)


@dataclass(frozen=True)
class TableConfig:
    """Everything ``ShardedPageTable`` takes, as read from YAML."""

    max_num_reqs: int
    max_model_len: int
    max_num_batched_tokens: int
    page_sizes: tuple[int, ...]
    num_shards: int = 1
    backend: str = "local"
    row_axis: str = "data"
    mesh: Mapping[str, int] | None = None
    num_pages: int | None = None
    warmup: bool = True
    recover: str = "manual"
    max_recoveries: int = 3
    ray: RayOptions = field(default_factory=RayOptions)

    def __post_init__(self) -> None:
        for key in ("max_num_reqs", "max_model_len", "max_num_batched_tokens", "num_shards"):
            _positive_int(key, getattr(self, key))
        if not isinstance(self.page_sizes, tuple | list) or not self.page_sizes:
            raise ConfigError(f"page_sizes must be a non-empty list, got {self.page_sizes!r}")
        for size in self.page_sizes:
            _positive_int("page_sizes", size)
        object.__setattr__(self, "page_sizes", tuple(self.page_sizes))
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"backend must be 'local' or 'ray', got {self.backend!r}")
        if not isinstance(self.row_axis, str) or not self.row_axis:
            raise ConfigError(f"row_axis must be a non-empty string, got {self.row_axis!r}")
        if self.mesh is not None:
            if not isinstance(self.mesh, Mapping) or not self.mesh:
                raise ConfigError(f"mesh must be a mapping of axis sizes, got {self.mesh!r}")
            for name, size in self.mesh.items():
                _positive_int(f"mesh.{name}", size)
            if self.row_axis not in self.mesh:
                raise ConfigError(f"row_axis {self.row_axis!r} is not an axis of mesh {self.mesh}")
        if self.num_pages is not None:
            _positive_int("num_pages", self.num_pages)
        if not isinstance(self.warmup, bool):
            raise ConfigError(f"warmup must be true or false, got {self.warmup!r}")
        if self.recover not in _RECOVER:
            raise ConfigError(f"recover must be one of {_RECOVER}, got {self.recover!r}")
        _positive_int("max_recoveries", self.max_recoveries)
        object.__setattr__(self, "ray", RayOptions.from_value(self.ray))

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
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if data is None:
            raise ConfigError(f"config file {path} is empty")
        return cls.from_dict(data, **overrides)

    def shape(self) -> tuple[int, int, int, tuple[int, ...]]:
        """The positional arguments of ``ShardedPageTable`` for this config."""
        return self.max_num_reqs, self.max_model_len, self.max_num_batched_tokens, self.page_sizes

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ShardedPageTable`` for this config."""
        return {
            "num_shards": self.num_shards,
            "backend": self.backend,
            "mesh": self.mesh,
            "row_axis": self.row_axis,
            "num_pages": self.num_pages,
            "warmup": self.warmup,
            "recover": self.recover,
            "max_recoveries": self.max_recoveries,
            "ray": self.ray,
        }
