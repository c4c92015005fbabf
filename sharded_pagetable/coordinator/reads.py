"""What the driver makes of the shards' answers to a read."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..shard.step_inputs import StepInputs


def gather_step_inputs(parts: Sequence[StepInputs | None]) -> StepInputs:
    """One table's step inputs from every shard's part (numpy, in shard order); raises if
    the last epoch carried no schedule."""
    if any(p is None for p in parts):
        raise RuntimeError(
            "the last epoch carried no schedule: commit(num_reqs, num_scheduled_tokens=..., "
            "num_computed_tokens=...) first"
        )
    return StepInputs(
        np.concatenate([p.token_rows for p in parts]),
        np.concatenate([p.positions for p in parts]),
        tuple(np.concatenate(g) for g in zip(*(p.slot_mapping for p in parts), strict=True)),
        np.concatenate([p.kv_lens for p in parts]),
        np.concatenate([p.cu_q_lens for p in parts]),
    )
