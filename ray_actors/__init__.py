"""Ray side of sharded-pagetable: shard actors, the Ray backend and cluster helpers.

Importing this package imports Ray; the core package only does so for ``backend="ray"``.
"""
