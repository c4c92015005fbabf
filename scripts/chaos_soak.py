"""Chaos soak: kill shard processes with SIGKILL during a serving workload, recover, check.

    scripts/dev.sh bench chaos_soak                      # 50 kills, 15 inside a commit
    scripts/dev.sh bench chaos_soak --kills 10 --steps 40
    scripts/dev.sh bench chaos_soak --standby            # recover onto pre-started shards
    scripts/dev.sh bench chaos_soak --survivable --shards 4   # replace only the dead shards
    scripts/dev.sh bench chaos_soak --serving            # survivable shards under a model step

Prints kills survived, rows lost, mixed-epoch arrays and recovery time p50/p99; exits
non-zero if any row was lost, any array mixed epochs or the mirror diverged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ray_actors.cluster import start_local
from sharded_pagetable.testing.chaos import ChaosConfig, run_chaos
from sharded_pagetable.testing.chaos_serving import ServingChaosConfig, run_serving_chaos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--in-commit", type=int, default=15)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--standby", action="store_true", help="ray.standby: recover onto pre-started shards"
    )
    parser.add_argument(
        "--survivable",
        action="store_true",
        help="ray.survivable: replace only the dead shard processes",
    )
    parser.add_argument(
        "--serving",
        action="store_true",
        help="the serving soak: 4 survivable shards, serve_step checked against dense "
        "attention every step, migrations, kills inside model steps too",
    )
    parser.add_argument("--in-step", type=int, default=10, help="kills inside a model step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    import ray

    start_local(namespace="chaos_soak")
    t0 = time.perf_counter()

    def progress(r) -> None:
        print(f"\rstep {r.steps}/{args.steps} kills {r.kills}", end="", flush=True)

    try:
        if args.serving:
            report = run_serving_chaos(
                ServingChaosConfig(
                    steps=args.steps,
                    kills=args.kills,
                    in_commit=args.in_commit,
                    in_step=args.in_step,
                    seed=args.seed,
                    num_shards=max(args.shards, 4),
                ),
                progress=progress,
            )
        else:
            report = run_chaos(
                ChaosConfig(
                    steps=args.steps,
                    kills=args.kills,
                    in_commit=args.in_commit,
                    seed=args.seed,
                    num_shards=args.shards,
                    standby=args.standby,
                    survivable=args.survivable,
                ),
                progress=progress,
            )
    finally:
        ray.shutdown()
    print()
    print(report.summary())
    print(f"wall time {time.perf_counter() - t0:.0f}s")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
