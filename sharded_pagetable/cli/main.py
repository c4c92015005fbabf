"""Command line: ``python -m sharded_pagetable demo|info``.

``demo`` drives a table from a YAML config through a serving workload (one commit and one
slot mapping per step), checks the device state against the mirror every few steps through
``run_on_shards``, and ends with a summary table and a plot. ``info`` prints the layout.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ray-local.yaml"


def _prepare_jax(config) -> None:
    """Give this process enough CPU devices for an in-process mesh, before JAX starts."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if config.backend == "local":
        wanted = math.prod(config.mesh.values()) if config.mesh else 8
        jax.config.update("jax_num_cpu_devices", wanted)


class _BadConfig(Exception):
    pass


def _load(path: str, overrides: dict):
    from ..config import TableConfig
    from ..errors import ConfigError

    try:
        config = TableConfig.from_yaml(path, **overrides)
    except FileNotFoundError:
        raise _BadConfig(f"config file not found: {path}") from None
    except OSError as exc:  # a directory, no permission, ...
        raise _BadConfig(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except ConfigError as exc:
        raise _BadConfig(f"bad config {path}: {exc}") from None
    _prepare_jax(config)
    return config


def cmd_info(args: argparse.Namespace) -> int:
    config = _load(args.config, {})
    from ..routing.layout import ShardLayout

    axes = dict(config.mesh) if config.mesh else None
    if config.backend == "ray":
        axes = axes or {config.row_axis: config.num_shards * config.ray.devices_per_shard}
        per_process = config.ray.devices_per_shard
    else:
        import jax

        axes = axes or {config.row_axis: len(jax.devices())}
        per_process = math.prod(axes.values())
    layout = ShardLayout(config.max_num_reqs, config.num_shards, axes[config.row_axis])
    replicas = math.prod(axes.values()) // axes[config.row_axis]
    print(f"config      {args.config}")
    print(f"backend     {config.backend}   mesh {axes}   row axis {config.row_axis!r}")
    print(
        f"rows        {config.max_num_reqs} = {layout.num_blocks} blocks x "
        f"{layout.rows_per_block} rows; {layout.rows_per_shard} rows per shard"
    )
    widths = [math.ceil(config.max_model_len / s) for s in config.page_sizes]
    print(f"groups      page sizes {list(config.page_sizes)} -> pages per row {widths}")
    print(f"{'shard':>5}  {'rows':>13}  {'row blocks':>11}  devices")
    for s in range(layout.num_shards):
        rows = layout.shard_rows(s)
        blocks = layout.shard_blocks(s)
        if config.backend == "ray":
            where = f"process {s}: {per_process} local {config.ray.platform} devices"
        else:
            first = blocks.start * replicas
            where = f"process 0: devices {first}..{first + len(blocks) * replicas - 1}"
        print(
            f"{s:>5}  [{rows.start:>5}, {rows.stop:>5})  "
            f"[{blocks.start:>3}, {blocks.stop:>3})   {where}"
        )
    return 0


def _check_devices(table, num_reqs: int) -> list[str]:
    """Compare every shard process's view of the device arrays with the mirror."""
    import numpy as np

    from .checks import host_row_digests, row_digests

    problems = []
    per_shard = table.run_on_shards(row_digests)
    for g in range(len(table)):
        want = host_row_digests(table[g].get_cpu_tensor()[:num_reqs])
        for s, digests in enumerate(per_shard):
            bad = np.flatnonzero(digests[g][:num_reqs] != want)
            if bad.size:
                problems.append(f"group {g}: shard process {s} sees rows {bad[:5].tolist()} differ")
    return problems


def _check_mirror(table, workload, num_reqs: int) -> list[str]:
    """The mirror must hold exactly the pages the workload gave each live row."""
    problems = []
    for g in range(len(table)):
        host = table[g]
        for row, req in enumerate(workload.rows[:num_reqs]):
            n = int(host.num_pages_per_row[row])
            if host.get_cpu_tensor()[row, :n].tolist() != req.pages[g]:
                problems.append(f"group {g}: row {row} does not hold request {req.rid}'s pages")
                break
        held = [p for r in workload.rows for p in r.pages[g]]
        if len(held) != len(set(held)):
            problems.append(f"group {g}: a page id is held by two live rows")
    return problems


def cmd_demo(args: argparse.Namespace) -> int:
    config = _load(args.config, {})
    if args.address:
        import dataclasses

        ray_options = dataclasses.replace(config.ray, address=args.address)
        config = dataclasses.replace(config, ray=ray_options)
    import numpy as np
    from tqdm import tqdm

    from ..serving.workload import ServingWorkload, WorkloadConfig, apply_ops

    print(f"starting {config.backend} backend: {config.num_shards} shards from {args.config}")
    t0 = time.perf_counter()
    try:
        from ..coordinator.coordinator import ShardedPageTable

        table = ShardedPageTable.from_config(config)
    except Exception as exc:
        if config.backend == "ray":
            print(
                f"error: could not start the Ray backend ({type(exc).__name__}: {exc}).\n"
                "Ray must be able to start locally (or reach ray.address); nothing was run.",
                file=sys.stderr,
            )
            return 2
        raise
    print(f"ready in {time.perf_counter() - t0:.1f}s")
    max_len = config.max_model_len
    wl_config = WorkloadConfig(
        seed=args.seed,
        arrivals_per_step=args.arrivals,
        prompt_len=(min(16, max_len // 4), max(16, min(args.max_prompt, max_len // 2))),
        output_len=(min(8, max_len // 4), max(8, min(args.max_output, max_len // 2))),
        token_budget=config.max_num_batched_tokens,
    )
    workload = ServingWorkload(wl_config, config.max_num_reqs, max_len, config.page_sizes)
    rps = table.layout.rows_per_shard
    commit_us, dirty, sent, live, problems = [], [], [], [], []
    cross = tokens = checks = 0
    with table:
        for step_no in tqdm(range(args.steps), desc="steps", unit="step", disable=args.quiet):
            step = workload.step()
            apply_ops(table, step.ops)
            cross += sum(
                1
                for name, a in step.ops
                if name in ("move_row", "swap_row") and a[0] // rps != a[1] // rps
            )
            t = time.perf_counter()
            receipt = table.commit(step.num_reqs)
            commit_us.append((time.perf_counter() - t) * 1e6)
            dirty.append(receipt.rows)
            sent.append(receipt.bytes)
            live.append(step.num_reqs)
            for g in range(len(table)):
                table.compute_slot_mapping(g, step.token_rows, step.token_positions)
            tokens += step.token_rows.size
            if (step_no + 1) % args.check_every == 0 or step_no + 1 == args.steps:
                checks += 1
                problems += _check_mirror(table, workload, step.num_reqs)
                problems += _check_devices(table, step.num_reqs)
                if problems:
                    break
        # Publish everything and compare whole snapshots with the mirror.
        table.commit(config.max_num_reqs)
        for g in range(len(table)):
            if not np.array_equal(table.device_snapshot(g), table[g].get_cpu_tensor()):
                problems.append(f"group {g}: final device snapshot differs from the mirror")
        checks += 1
    _summary(args, config, workload, commit_us, dirty, sent, cross, tokens, checks, problems)
    if not args.no_plot:
        _plot(args.plot, commit_us, dirty, live)
        print(f"plot        {args.plot}")
    if problems:
        print("CHECK FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


def _summary(args, config, workload, commit_us, dirty, sent, cross, tokens, checks, problems):
    import numpy as np

    changed = [u for u, d in zip(commit_us, dirty, strict=True) if d]
    rows = [
        ("backend", f"{config.backend}, {config.num_shards} shards"),
        ("steps", f"{len(commit_us)}"),
        ("requests served", f"{workload.served} (live at end: {len(workload.rows)})"),
        ("tokens scheduled", f"{tokens}"),
        ("rows moved across shards", f"{cross}"),
        (
            "commit p50 / p99",
            f"{np.percentile(commit_us, 50):.0f} / {np.percentile(commit_us, 99):.0f} us",
        ),
        ("commit p50 (rows changed)", f"{np.percentile(changed, 50):.0f} us" if changed else "-"),
        ("dirty rows per commit", f"mean {np.mean(dirty):.1f}, max {max(dirty)}"),
        ("bytes per commit", f"mean {np.mean(sent):.0f}, max {max(sent)}"),
        ("checks", f"{checks} ({'FAILED' if problems else 'all passed'})"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print("+" + "-" * (width + 2) + "+" + "-" * 42 + "+")
    for key, value in rows:
        print(f"| {key:<{width}} | {value:<40} |")
    print("+" + "-" * (width + 2) + "+" + "-" * 42 + "+")


def _plot(path: str, commit_us, dirty, live) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    ax[0].plot(commit_us, lw=0.8, color="tab:blue")
    ax[0].set_ylabel("commit time (us)")
    ax[0].set_yscale("log")
    ax[0].set_title("sharded-pagetable demo: one commit per scheduler step")
    ax[1].plot(dirty, lw=0.8, color="tab:orange", label="row updates sent (all groups)")
    ax[1].plot(live, lw=0.8, color="tab:green", label="live rows (num_reqs)")
    ax[1].set_ylabel("rows")
    ax[1].set_xlabel("step")
    ax[1].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sharded-pagetable", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the serving demo on a config")
    demo.add_argument("--config", default=str(DEFAULT_CONFIG))
    demo.add_argument("--address", help="Ray cluster address (overrides ray.address)")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--check-every", type=int, default=25)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--arrivals", type=float, default=6.0, help="mean new requests per step")
    demo.add_argument("--max-prompt", type=int, default=2048)
    demo.add_argument("--max-output", type=int, default=512)
    demo.add_argument("--plot", default="out/demo.png")
    demo.add_argument("--no-plot", action="store_true")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="print which rows and devices each shard owns")
    info.add_argument("--config", default=str(DEFAULT_CONFIG))
    info.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) < 1 or getattr(args, "check_every", 1) < 1:
        parser.error("--steps and --check-every must be positive")
    try:
        return args.func(args)
    except _BadConfig as exc:
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)  # one line
        return 2
