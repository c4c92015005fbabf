"""Routing math: which shard, local row and device block hold a row; process-ordered meshes."""
