"""The demo's summary table and plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .demo import DemoStats, kv_bytes, live_rows


def _us(values: list[float], *quantiles: int) -> str:
    return " / ".join(f"{np.percentile(values, q):.0f}" for q in quantiles) + " us"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def summary(args, config, workload, stats: DemoStats) -> None:
    served = config.pages_per_shard is not None
    changed = [u for u, d in zip(stats.commit_us, stats.dirty, strict=True) if d]
    live = len(live_rows(workload))
    rows = [
        ("backend", f"{config.backend}, {config.num_shards} shards"),
        ("steps", f"{len(stats.commit_us)}"),
        ("requests served", f"{workload.served} (live at end: {live})"),
        ("tokens scheduled", f"{sum(stats.tokens)}"),
        ("rows moved across shards", f"{stats.cross}"),
        ("commit p50 / p99", _us(stats.commit_us, 50, 99)),
        ("commit p50 (rows changed)", _us(changed, 50) if changed else "-"),
        ("dirty rows per commit", f"mean {np.mean(stats.dirty):.1f}, max {max(stats.dirty)}"),
        ("bytes per commit", f"mean {np.mean(stats.sent):.0f}, max {max(stats.sent)}"),
    ]
    if served:
        moved = kv_bytes(stats, config, args)
        per_group = ", ".join(_mib(b) for b in moved)
        err = "-" if stats.max_error is None else f"{stats.max_error:.1e}"
        rows += [
            ("step inputs", "built in the shards, in the serving step"),
            ("serving step p50 / p99", _us(stats.serve_us, 50, 99)),
            ("attention rows checked", f"{stats.rows_checked}"),
            ("attention tokens checked", f"{stats.tokens_checked}"),
            ("attention max error", f"{err} (limit 1e-4)"),
            ("migrations", f"{workload.migrations} ({workload.kv_pages_moved} KV pages)"),
            ("KV bytes moved", f"{_mib(sum(moved))} (per group {per_group})"),
        ]
    if stats.kills:
        rec = stats.recovery_s
        rows += [
            ("shard processes killed", f"{stats.kills} (recoveries {len(rec)})"),
            (
                "recovery p50 / max",
                " / ".join(f"{v:.2f} s" for v in (np.median(rec), max(rec))) if rec else "-",
            ),
            ("rows whose KV was lost", f"{stats.kv_rows_lost} (recomputed)"),
            ("survivors restarted", f"{stats.survivors_restarted}"),
        ]
    rows.append(("checks", f"{stats.checks} ({'FAILED' if stats.problems else 'all passed'})"))
    width = max(len(k) for k, _ in rows)
    cell = max(40, max(len(v) for _, v in rows))
    print()
    print("+" + "-" * (width + 2) + "+" + "-" * (cell + 2) + "+")
    for key, value in rows:
        print(f"| {key:<{width}} | {value:<{cell}} |")
    print("+" + "-" * (width + 2) + "+" + "-" * (cell + 2) + "+")


def plot(path: str, stats: DemoStats) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    served = bool(stats.serve_us)
    fig, ax = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    commit = "commit with schedule" if served else "commit"
    ax[0].plot(np.asarray(stats.commit_us) / 1e3, lw=0.8, color="tab:blue", label=commit)
    if served:
        ax[0].plot(
            np.asarray(stats.serve_us) / 1e3,
            lw=0.8,
            color="tab:red",
            label="serving step (step inputs, KV copies, K/V write, attention)",
        )
    ax[0].set_ylabel("time (ms)")
    ax[0].set_yscale("log")
    ax[0].legend(loc="upper right", fontsize=8)
    what = "one commit and one model step" if served else "one commit"
    ax[0].set_title(f"sharded-pagetable demo: {what} per scheduler step")
    ax[1].plot(stats.dirty, lw=0.8, color="tab:orange", label="row updates sent (all groups)")
    ax[1].plot(stats.live, lw=0.8, color="tab:green", label="num_reqs (last live row + 1)")
    ax[1].set_ylabel("rows")
    ax[1].legend(loc="upper left", fontsize=8)
    ax[2].plot(stats.tokens, lw=0.8, color="tab:purple")
    ax[2].set_ylabel("tokens scheduled")
    ax[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
