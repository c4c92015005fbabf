"""Command line: ``python -m sharded_pagetable demo|info``.

``demo`` drives a table from a YAML config through a serving workload. With
``pages_per_shard`` (KV-local page pools) every step is one commit carrying the schedule and
one model step in every shard process (KV copies, K/V writes, paged attention), checked
against dense attention every few steps; without it, one commit per step. Either way the
device state is compared with the mirror through ``run_on_shards``, and the run ends with a
summary table and a plot. ``info`` prints the layout.
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
    try:
        layout = ShardLayout.fit(config.max_num_reqs, config.num_shards, axes[config.row_axis])
    except ValueError as exc:  # shards that do not fit this machine's devices
        raise _BadConfig(f"bad config {args.config}: {exc}") from None
    replicas = math.prod(axes.values()) // axes[config.row_axis]
    print(f"config      {args.config}")
    print(f"backend     {config.backend}   mesh {axes}   row axis {config.row_axis!r}")
    capacity = layout.max_num_reqs
    rounded = "" if capacity == config.max_num_reqs else f" (capacity {capacity}: rounded up)"
    print(
        f"rows        {config.max_num_reqs}{rounded} = {layout.num_blocks} blocks x "
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


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo, report

    config = demo.with_address(_load(args.config, {}), args.address)
    if args.kill_every < 0:
        print(f"error: --kill-every must be >= 0, got {args.kill_every}", file=sys.stderr)
        return 2
    if args.kill_every and (
        config.backend != "ray" or config.pages_per_shard is None or config.ray.address
    ):
        print(
            "error: --kill-every needs the Ray backend started on this machine (ray.address "
            "null) and pages_per_shard (a model step whose KV can be lost)",
            file=sys.stderr,
        )
        return 2
    print(f"starting {config.backend} backend: {config.num_shards} shards from {args.config}")
    t0 = time.perf_counter()
    try:
        from ..coordinator.coordinator import ShardedPageTable

        overrides = {"recover": "auto"} if args.kill_every else {}
        table = ShardedPageTable.from_config(config, **overrides).start()  # shards up now
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
    if config.pages_per_shard is None:
        print("no pages_per_shard in the config: commits only, no model step")
    with table:
        workload, stats = demo.run(args, config, table)
    report.summary(args, config, workload, stats)
    if not args.no_plot:
        report.plot(args.plot, stats)
        print(f"plot        {args.plot}")
    if stats.problems:
        print("CHECK FAILED:\n  " + "\n  ".join(stats.problems), file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sharded-pagetable", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the serving demo on a config")
    demo.add_argument("--config", default=str(DEFAULT_CONFIG))
    demo.add_argument("--address", help="Ray cluster address (overrides ray.address)")
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--check-every", type=int, default=25)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--arrivals", type=float, default=1.8, help="mean new requests per step")
    demo.add_argument("--max-prompt", type=int, default=512, help="capped at max_model_len / 2")
    demo.add_argument("--max-output", type=int, default=64, help="capped at max_model_len / 2")
    demo.add_argument("--q-heads", type=int, default=2, help="attention query heads")
    demo.add_argument("--kv-heads", type=int, default=1, help="attention KV heads")
    demo.add_argument("--head-dim", type=int, default=8, help="attention head dimension")
    demo.add_argument("--plot", default="out/demo.png")
    demo.add_argument("--no-plot", action="store_true")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument(
        "--kill-every",
        type=int,
        default=0,
        metavar="N",
        help="SIGKILL a random shard process every N steps (Ray on this machine, with "
        "page pools; the table recovers on its own)",
    )
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="print which rows and devices each shard owns")
    info.add_argument("--config", default=str(DEFAULT_CONFIG))
    info.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) < 1 or getattr(args, "check_every", 1) < 1:
        parser.error("--steps and --check-every must be positive")
    if args.command == "demo":
        if min(args.q_heads, args.kv_heads, args.head_dim) < 1 or args.q_heads % args.kv_heads:
            parser.error(
                "--q-heads, --kv-heads and --head-dim must be positive and --q-heads a multiple "
                f"of --kv-heads, got {args.q_heads}, {args.kv_heads}, {args.head_dim}"
            )
        if min(args.max_prompt, args.max_output) < 1 or args.arrivals < 0:
            parser.error("--max-prompt and --max-output must be positive, --arrivals >= 0")
    try:
        return args.func(args)
    except _BadConfig as exc:
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)  # one line
        return 2
