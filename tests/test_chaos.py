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


def test_serving_soak_costs_only_the_victims_kv(local_ray):
    """Survivable shards under a model step with migrations: kills between commits, inside
    commits and inside model steps; every token of a request whose KV was not reported lost
    matches dense attention, and no survivor is ever restarted."""
    from sharded_pagetable.testing.chaos_serving import ServingChaosConfig, run_serving_chaos

    report = run_serving_chaos(
        ServingChaosConfig(steps=24, kills=6, in_commit=2, in_step=2, seed=2, timeout_s=20)
    )
    print(report.summary())
    assert report.steps == 24
    assert (report.kills, report.kills_in_commit, report.kills_in_step) == (6, 2, 2)
    assert report.recoveries >= 6
    assert report.shards_replaced == 6 and report.survivors_restarted == 0
    assert report.kv_rows_lost > 0  # the victims' rows, and only theirs (checked per token)
    assert report.tokens_checked > 500 and report.tokens_wrong == 0
    assert report.migrations > 0
    assert report.ok
