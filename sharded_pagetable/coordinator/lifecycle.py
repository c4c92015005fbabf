"""A table's shards from plan to close: started when the table first needs them.

Engines build many page tables and use most of them on the host only (EasyDeL's eSurge
builds about 16 per engine, and closes none). A table therefore starts its shards at the
first call that needs them (a commit, a device read, ``run_on_shards``, ``start()``), not in
its constructor: building a table costs what building its host mirror costs, whatever the
backend. Taking over running shards (``attach``) and a backend object handed in are started
at once, since there is nothing to defer.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

from .backend import Backend
from .start import ShardPlan


def _let_go(backend: Backend) -> None:
    """What a table dropped without ``close()`` does to its shards: stop the ones it
    started (no clean JAX shutdown to wait for; Ray itself keeps running for other tables)
    and let go of the others, and of a detached table's (they outlive their driver by
    design). Never raises: it may run while the interpreter exits."""
    options = getattr(backend, "options", None)  # RayOptions of a Ray backend
    with contextlib.suppress(Exception):
        if not backend.started_shards or getattr(options, "detached", False):
            backend.detach()
        elif hasattr(backend, "stop_shards"):
            backend.stop_shards()
        else:
            backend.close(clean=False)


class ShardLifecycle:
    """Whether a table's shards run yet, and the backend once they do.

    Args:
      plan: where the shards will live and how to start them.
    """

    def __init__(self, plan: ShardPlan) -> None:
        self.plan = plan
        self.backend: Backend | None = None  # the started backend
        self.closed = False
        self._finalizer: weakref.finalize | None = None

    @property
    def started(self) -> bool:
        return self.backend is not None

    def get(self, owner: object, take: Callable[[Backend], None]) -> Backend:
        """The started backend, starting it first if need be: ``take(backend)`` fences the
        new shards (or takes over running ones). If starting or ``take`` fails, whatever was
        started is released (``release(backend)``, see :meth:`release`) and the error
        raised; the next call starts again. ``owner`` (the table) being dropped without
        ``close()`` stops the shards it started."""
        if self.closed:
            raise RuntimeError("this ShardedPageTable is closed")
        if self.backend is not None:
            return self.backend
        backend = self.plan.start()
        try:
            take(backend)
        except BaseException:
            self.release(backend)
            raise
        self.backend = backend
        self._finalizer = weakref.finalize(owner, _let_go, backend)
        return backend

    @staticmethod
    def release(backend: Backend) -> None:
        """Undo a start that failed half-way: stop the shards it started, let go of the
        ones it found running (an attach)."""
        if backend.started_shards:
            backend.close(clean=False)
        else:
            backend.detach()

    def close(self) -> Backend | None:
        """Mark the table closed; returns the started backend (None if the shards never
        started), which the caller stops or lets go of."""
        self.closed = True
        backend, self.backend = self.backend, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        return backend
