"""CI-sized chaos soak: SIGKILLed shard processes between and inside commits, recovered
automatically, with nothing lost (checked against an independent single-process replay)."""

import pytest

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.multiprocess]


def test_chaos_soak_survives_kills_with_nothing_lost(local_ray):
    from sharded_pagetable.testing.chaos import ChaosConfig, run_chaos

    report = run_chaos(ChaosConfig(steps=20, kills=4, in_commit=2, seed=1))
    print(report.summary())
    assert report.steps == 20
    assert report.kills == 4 and report.kills_in_commit == 2
    assert report.recoveries >= 4  # every kill was noticed and repaired
    assert report.rows_lost == 0
    assert report.mixed_epoch_arrays == 0
    assert report.mirror_mismatches == 0
    assert report.ok
