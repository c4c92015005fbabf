"""The default a ``ShardedPageTable`` takes what its caller does not say from.

A serving engine builds its page tables the way it builds ``MultiGroupPageTable`` (shape
and ``sharding`` only) and never says how many shards, which backend or which mesh. Those
come from the default in effect when the table is built, the first of:

1. what :func:`configure` set in this process (``sp.configure(num_shards=4, ...)``);
2. the YAML file named by ``$SHARDED_PAGETABLE_CONFIG`` (the keys of a ``configs/`` file
   without the table's shape: ``num_shards``, ``backend``, ``mesh``, ``ray``, ...), read
   again when the file changes;
3. ``TableDefaults()``: one in-process shard over this process's devices.

A keyword the constructor is given always wins over the default.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from .config import TableDefaults
from .errors import ConfigError

ENV_VAR = "SHARDED_PAGETABLE_CONFIG"

_lock = threading.Lock()
_configured: TableDefaults | None = None
_from_file: tuple[tuple[str, int, int], TableDefaults] | None = None  # (path, mtime, size)


def configure(source: TableDefaults | str | None = None, /, **fields: Any) -> TableDefaults | None:
    """Set the default of every ``ShardedPageTable`` built from now on in this process.

    Args:
      source: a :class:`TableDefaults`, or the path of a YAML file of its keys; None starts
        from ``TableDefaults()``.
      fields: keys of :class:`TableDefaults` set over ``source`` (``num_shards=4``,
        ``backend="ray"``, ``ray={"devices_per_shard": 1}``, ...).

    Returns the default it set. ``configure()`` with no argument at all forgets what an
    earlier call set (the environment variable, if set, applies again) and returns None.
    Bad keys or values raise :class:`~sharded_pagetable.errors.ConfigError` and change
    nothing.

    Example::

      sp.configure(num_shards=4, backend="ray", ray={"devices_per_shard": 1})
      table = sp.ShardedPageTable(256, 4096, 2048, [16, 64])   # 4 Ray shard processes
    """
    global _configured
    if source is None and not fields:
        with _lock:
            _configured = None
        return None
    if isinstance(source, str):
        config = TableDefaults.from_yaml(source, **fields)
    elif isinstance(source, TableDefaults):
        config = TableDefaults.from_dict(source.kwargs(), **fields) if fields else source
    elif source is None:
        config = TableDefaults.from_dict({}, **fields)
    else:
        raise TypeError(
            f"configure takes a TableDefaults or a YAML path, got {type(source).__name__}"
        )
    with _lock:
        _configured = config
    return config


def default_config() -> TableDefaults:
    """The default in effect now (see the module docstring for the order)."""
    global _from_file
    with _lock:
        if _configured is not None:
            return _configured
        path = os.environ.get(ENV_VAR)
        if not path:
            return TableDefaults()
        try:
            stat = os.stat(path)  # a missing file is an error, not a silent default
        except OSError as exc:
            raise ConfigError(f"${ENV_VAR}={path}: cannot read it ({exc.strerror})") from None
        key = (path, stat.st_mtime_ns, stat.st_size)
        if _from_file is None or _from_file[0] != key:
            _from_file = (key, TableDefaults.from_yaml(path))
        return _from_file[1]
