"""A/B of a benchmark script: this checkout against an older commit, alternating, in one run.

The machine is noisy (figures drift by 20-40% between minutes), so one run of each tree
proves little. This script checks the older commit out into a temporary git worktree, then
runs the benchmark of each tree in turn, ``--rounds`` times, swapping which goes first every
round, and prints each figure's median over the rounds for both trees with their ratio and
the median of the per-round ratios (the figure least moved by drift).

    scripts/dev.sh bench bench_compare --base 0d894e7                       # bench_sharded
    scripts/dev.sh bench bench_compare --base 0d894e7 --bench bench_page_table
    scripts/dev.sh bench bench_compare --base 0d894e7 --only ray -- --steps 200

Arguments after ``--`` go to both benchmark runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent


def figures(bench: str, doc: object) -> dict[str, float]:
    """The timed figures (microseconds) a benchmark's JSON holds, by name."""
    if bench == "bench_sharded":
        return {f"{r['name']} p50": r["p50_us"] for r in doc} | {
            f"{r['name']} p99": r["p99_us"] for r in doc
        }
    if bench == "bench_page_table":
        out = {}
        for op, runs in doc["per_op"].items():
            for who, stats in runs.items():
                out[f"{op} [{who}]"] = stats["median"]
        for shape, res in doc["commit"].items():
            for level, runs in res["levels"].items():
                for who, stats in runs.items():
                    out[f"commit {shape} dirty {level} [{who}]"] = stats["median"]
        return out
    raise SystemExit(f"bench_compare does not know how to read {bench}'s results")


def short(rev: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=HERE, check=True, capture_output=True, text=True
    ).stdout.strip()


def run_once(tree: Path, bench: str, extra: list[str], out: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, f"scripts/{bench}.py", *extra, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{bench} failed in {tree}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return figures(bench, json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the older commit (any git revision)")
    parser.add_argument("--head", help="the newer commit (default: this checkout as it is)")
    parser.add_argument("--bench", default="bench_sharded", help="script of scripts/ to run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="regular expression: report only matching figures")
    parser.add_argument("--limit", type=float, default=1.15, help="ratio flagged as a miss")
    parser.add_argument("extra", nargs="*", help="arguments for the benchmark (after --)")
    args = parser.parse_args()
    rev = short(args.base)
    head_rev = short(args.head) if args.head else "this checkout"
    runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        base, head = Path(tmp) / "base", Path(tmp) / "head" if args.head else HERE
        trees = [(base, rev)] + ([(head, head_rev)] if args.head else [])
        for tree, commit in trees:
            subprocess.run(
                ["git", "worktree", "add", "--detach", "-q", str(tree), commit],
                cwd=HERE,
                check=True,
            )
        try:
            for r in range(args.rounds):
                order = [("base", base), ("head", head)]
                for who, tree in order if r % 2 == 0 else order[::-1]:
                    print(f"round {r + 1}/{args.rounds}: {who} ...", flush=True)
                    out = Path(tmp) / f"{who}-{r}.json"
                    runs[who].append(run_once(tree, args.bench, args.extra, out))
        finally:
            for tree, _ in trees:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=HERE)
    names = [n for n in runs["head"][0] if all(n in run for run in runs["base"] + runs["head"])]
    if args.only:
        names = [n for n in names if re.search(args.only, n)]
    width = max(len(n) for n in names)
    print(f"\n{args.bench}: base {rev} vs {head_rev}, {args.rounds} alternating rounds (us)")
    print(f"{'figure':<{width}} {'base':>9} {'head':>9} {'ratio':>7} {'per-round':>10}  rounds")
    for name in names:
        old = np.array([run[name] for run in runs["base"]])
        new = np.array([run[name] for run in runs["head"]])
        ratio, paired = np.median(new) / np.median(old), np.median(new / old)
        flag = "  MISS" if paired > args.limit else ""
        each = " ".join(f"{x:.2f}" for x in new / old)
        print(
            f"{name:<{width}} {np.median(old):>9.0f} {np.median(new):>9.0f} {ratio:>6.2f}x "
            f"{paired:>9.2f}x  {each}{flag}"
        )


if __name__ == "__main__":
    main()
