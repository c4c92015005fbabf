"""Paired A/B of the commit path: this checkout against an older commit, step by step in one run.

On a noisy machine two separate benchmark runs differ by more than the change being judged
(figures drift by 20-40% from one minute to the next, see ``bench_compare``). Here both
versions run in the same process at the same time: the older commit's packages are copied
under other names (``spt_base``, ``spt_base_ray``), both tables of each kind are built side
by side, the same seeded steps of ``bench_sharded`` are replayed on both, and each step
times the two commits back to back, swapping which goes first every step. The ratio of
medians and the median of the per-step ratios are then measured under the same load.

    scripts/dev.sh bench bench_ab --base 0d894e7                 # every table kind
    scripts/dev.sh bench bench_ab --base 0d894e7 --only ray --steps 400

After the sharded kinds it times the single-process ``PageTable`` commit the same way, at
the dirty-row levels of ``bench_page_table`` (``--page-table-reps 0`` skips it).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
RENAMES = {"sharded_pagetable": "spt_base", "ray_actors": "spt_base_ray"}


def export_base(rev: str, dest: Path) -> None:
    """The packages of commit ``rev`` under ``dest``, renamed (imports rewritten to match)."""
    archive = subprocess.run(
        ["git", "archive", rev, *RENAMES], cwd=HERE, check=True, capture_output=True
    ).stdout
    src = dest / "src"
    src.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pattern = re.compile(r"\b(" + "|".join(RENAMES) + r")\b")
    for old, new in RENAMES.items():
        for path in (src / old).rglob("*"):
            target = dest / new / path.relative_to(src / old)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif path.suffix == ".py":
                target.parent.mkdir(parents=True, exist_ok=True)
                text = pattern.sub(lambda m: RENAMES[m.group(1)], path.read_text())
                target.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the older commit (any git revision)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", help="regular expression: run only matching table kinds")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--page-table-reps", type=int, default=200, help="0: skip that part")
    args = parser.parse_args()
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.base], cwd=HERE, check=True, capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        export_base(rev, Path(tmp))
        # Ray's workers start from this environment: they must find both versions too.
        paths = [tmp, str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
        os.environ["PYTHONPATH"] = ":".join(paths)
        sys.path[:0] = [tmp, str(HERE), str(HERE / "scripts")]
        run(rev, args)


def run(rev: str, args: argparse.Namespace) -> None:
    import numpy as np

    bench = importlib.import_module("bench_sharded")  # sets up 8 CPU devices
    import spt_base as base

    import sharded_pagetable as head

    rows, max_len, budget, sizes = bench.ROWS, bench.MAX_LEN, bench.BUDGET, bench.PAGE_SIZES

    def kinds(sp):
        from importlib import import_module

        try:  # where the mesh helpers live depends on the version
            mesh = import_module(sp.__name__ + ".routing.mesh")
        except ModuleNotFoundError:
            mesh = import_module(sp.__name__ + ".mesh")
        sharding = mesh.row_sharding(mesh.build_mesh(None, "data"), "data")
        out = {
            "MultiGroupPageTable (1 device)": lambda: sp.MultiGroupPageTable(
                rows, max_len, budget, sizes
            ),
            "MultiGroupPageTable (8 devices)": lambda: sp.MultiGroupPageTable(
                rows, max_len, budget, sizes, sharding=sharding
            ),
        }
        for n in (1, 2, 4):
            out[f"Sharded local, {n} shard(s), 8 devices"] = lambda n=n: sp.ShardedPageTable(
                rows, max_len, budget, sizes, num_shards=n
            )
        for n in () if args.no_ray else (2, 4):
            out[f"Sharded ray, {n} processes x {8 // n} devices"] = lambda n=n: bench.ray_table(
                n, lib=sp
            )
        return out

    def settle(table) -> None:
        """Finish the device work a commit started (the Ray shards ack after dispatching)."""
        if getattr(table, "backend_name", "local") == "local":
            for g in range(len(table)):
                table[g].get_device_tensor().block_until_ready()

    if not args.no_ray:
        from ray_actors.cluster import start_local

        start_local(namespace="bench_ab")
    init, plan = bench.make_steps(0, args.steps, rows, rows // 4)
    new_kinds, old_kinds = kinds(head), kinds(base)
    print(f"bench_ab: base {rev} vs this checkout, {args.steps} paired steps per table kind")
    print(f"{'table':<42} {'base p50':>9} {'head p50':>9} {'ratio':>7} {'per-step':>9}"
          f" {'base p99':>9} {'head p99':>9}")  # fmt: skip
    for name, make_new in new_kinds.items():
        if name not in old_kinds or (args.only and not re.search(args.only, name)):
            continue
        tables = {"base": old_kinds[name](), "head": make_new()}
        try:
            times = {"base": [], "head": []}
            for t in tables.values():
                bench.apply(t, init)
                t.commit(rows)
                settle(t)
            gc.disable()
            for i, (ops, _) in enumerate(plan):
                order = ["base", "head"] if i % 2 == 0 else ["head", "base"]
                for who in order:
                    t = tables[who]
                    bench.apply(t, ops)
                    t0 = time.perf_counter()
                    t.commit(rows)
                    settle(t)
                    times[who].append(time.perf_counter() - t0)
            gc.enable()
        finally:
            for t in tables.values():
                if hasattr(t, "close"):
                    t.close()
        old, new = (np.array(times[w]) * 1e6 for w in ("base", "head"))
        print(
            f"{name:<42} {np.median(old):>9.0f} {np.median(new):>9.0f} "
            f"{np.median(new) / np.median(old):>6.2f}x {np.median(new / old):>8.2f}x "
            f"{np.percentile(old, 99):>9.0f} {np.percentile(new, 99):>9.0f}",
            flush=True,
        )
    if args.page_table_reps and not args.only:
        run_page_table(head, base, args.page_table_reps)


def run_page_table(head, base, reps: int) -> None:
    """The single-process ``PageTable`` commit at 0, 1, 8 and 64 dirty rows (the shapes of
    ``bench_page_table``), each rep timed on both versions back to back."""
    import numpy as np

    rng = np.random.default_rng(0)

    def make(sp, rows, width):
        t = sp.PageTable(rows, width, 8192)
        for r in range(rows):
            t.add_row(list(range(width // 4)), r)
        t.commit(rows)
        t.get_device_tensor().block_until_ready()
        return t

    print(f"\nPageTable commit (1 device), {reps} paired reps per level")
    print(f"{'shape, dirty rows':<42} {'base p50':>9} {'head p50':>9} {'ratio':>7}")
    for rows, width in ((1024, 512), (4096, 2048)):
        tables = {"base": make(base, rows, width), "head": make(head, rows, width)}
        for dirty in (0, 1, 8, 64):
            times = {"base": [], "head": []}
            for i in range(reps):
                picked = rng.choice(rows, dirty, replace=False).tolist()
                for who in ("base", "head") if i % 2 == 0 else ("head", "base"):
                    t = tables[who]
                    for r in picked:  # grow the row, or empty a full one
                        t.append_row([7], r) if t.num_pages_per_row[r] < width else t.clear_row(r)
                    t0 = time.perf_counter()
                    t.commit(rows)
                    t.get_device_tensor().block_until_ready()
                    times[who].append(time.perf_counter() - t0)
            old, new = (np.median(times[w]) * 1e6 for w in ("base", "head"))
            name = f"{rows}x{width}, {dirty} dirty"
            print(f"{name:<42} {old:>9.1f} {new:>9.1f} {new / old:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
