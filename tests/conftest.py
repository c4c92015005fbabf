"""Test-wide setup: 8 CPU devices, set before any JAX backend starts; one local Ray shared by
the Ray test modules."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


class _SharedRay:
    """The local Ray (127.0.0.1) the Ray test modules share: started on first use, stopped
    at the end of the session, or earlier by a module that needs a cluster of its own."""

    started = False

    def start(self) -> str:
        import ray

        from ray_actors.cluster import start_local

        if not ray.is_initialized():
            start_local(namespace="spt_tests")
            self.started = True
        assert self.started, "a test left a Ray of its own running"
        return ray.get_runtime_context().gcs_address

    def stop(self) -> None:
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False


@pytest.fixture(scope="session")
def _shared_ray():
    shared = _SharedRay()
    yield shared
    shared.stop()


@pytest.fixture(scope="module")
def local_ray(_shared_ray) -> str:
    """A running local Ray, shared with every other Ray test module; its GCS address. Tests
    stop every shard they start (and their detached actors live in their own namespaces),
    so one module leaves nothing behind for the next."""
    return _shared_ray.start()


@pytest.fixture(scope="module")
def no_shared_ray(_shared_ray) -> None:
    """Stop the shared Ray (it starts again for the next module that asks for it): for a
    module that brings up a cluster of its own."""
    _shared_ray.stop()
