"""``python -m sharded_pagetable info|demo`` as subprocesses on the in-process config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_config import alias_bomb

REPO = Path(__file__).resolve().parent.parent
LOCAL = "configs/local.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A small in-process table with KV-local pools, so a served demo runs in seconds.
TINY = """\
max_num_reqs: 32
max_model_len: 256
max_num_batched_tokens: 64
page_sizes: [16, 32]
num_shards: 4
pages_per_shard: 64
backend: local
row_axis: data
mesh: {data: 8}
"""
TINY_ARGS = ("--max-prompt", "48", "--max-output", "40", "--arrivals", "1.5")


def tiny_config(tmp_path: Path, pools: bool = True) -> str:
    path = tmp_path / "tiny.yaml"
    text = TINY if pools else TINY.replace("pages_per_shard: 64\n", "")
    path.write_text(text)
    return str(path)


LOCAL_LINES = len((REPO / LOCAL).read_text().splitlines())


def line_of(prefix: str) -> int:
    """The line of configs/local.yaml that starts with ``prefix``."""
    lines = (REPO / LOCAL).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(prefix))


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "sharded_pagetable", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def summary_rows(stdout: str) -> dict[str, str]:
    """The ``| key | value |`` rows of the demo's summary table."""
    rows = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"\|\s(.+?)\s+\|\s(.*?)\s*\|", line)
        if m:
            rows[m.group(1).strip()] = m.group(2)
    return rows


def test_info_shows_a_row_capacity_rounded_up(tmp_path):
    """Rows that do not divide over the devices are a valid config: the capacity rounds up."""
    path = tmp_path / "rows.yaml"
    path.write_text((REPO / LOCAL).read_text().replace(": 256\n", ": 250\n"))
    res = run("info", "--config", str(path), timeout=120)
    assert res.returncode == 0, res.stderr
    want = r"rows\s+250 \(capacity 256: rounded up\) = 8 blocks x 32 rows; 64 rows per shard"
    assert re.search(want, res.stdout), res.stdout


def test_info_prints_one_line_per_shard():
    res = run("info", "--config", LOCAL)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "backend     local" in out
    assert re.search(r"rows\s+256 = 8 blocks x 32 rows; 64 rows per shard", out), out
    assert "page sizes [16, 64] -> pages per row [128, 32]" in out
    shard_lines = re.findall(
        r"^\s*(\d+)\s+\[\s*(\d+),\s*(\d+)\)\s+\[\s*(\d+),\s*(\d+)\)\s+(.*)$", out, re.M
    )
    assert len(shard_lines) == 4, out
    for s, (shard, lo, hi, blo, bhi, where) in enumerate(shard_lines):
        assert int(shard) == s
        assert (int(lo), int(hi)) == (64 * s, 64 * (s + 1))
        assert (int(blo), int(bhi)) == (2 * s, 2 * s + 2)
        assert where == f"process 0: devices {2 * s}..{2 * s + 1}"


def test_demo_runs_checks_and_plots(tmp_path):
    plot = tmp_path / "demo.png"
    res = run(
        "demo",
        "--config",
        tiny_config(tmp_path),
        *TINY_ARGS,
        "--steps",
        "30",
        "--check-every",
        "10",
        "--quiet",
        "--plot",
        str(plot),
    )
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    out = res.stdout
    rows = summary_rows(out)
    assert rows["backend"] == "local, 4 shards"
    assert rows["steps"] == "30"
    served = re.fullmatch(r"(\d+) \(live at end: (\d+)\)", rows["requests served"])
    assert served, rows["requests served"]
    assert int(served.group(2)) > 0
    assert int(rows["tokens scheduled"]) > 0
    assert re.fullmatch(r"\d+", rows["rows moved across shards"])
    p50_p99 = re.fullmatch(r"(\d+) / (\d+) us", rows["commit p50 / p99"])
    assert p50_p99, rows["commit p50 / p99"]
    assert int(p50_p99.group(1)) <= int(p50_p99.group(2))
    per_commit = re.fullmatch(r"mean (\d+), max (\d+)", rows["bytes per commit"])
    assert per_commit, rows["bytes per commit"]
    assert 0 < int(per_commit.group(1)) <= int(per_commit.group(2))
    # The model step: every scheduled token of the 3 checked steps against dense attention.
    assert rows["step inputs"] == "built in the shards, in the serving step"
    assert re.fullmatch(r"(\d+) / (\d+) us", rows["serving step p50 / p99"])
    assert int(rows["attention rows checked"]) > 0
    assert int(rows["attention tokens checked"]) >= int(rows["attention rows checked"])
    err = re.fullmatch(r"(\S+) \(limit 1e-4\)", rows["attention max error"])
    assert err and float(err.group(1)) < 1e-4, rows["attention max error"]
    migrations = re.fullmatch(r"(\d+) \((\d+) KV pages\)", rows["migrations"])
    assert migrations, rows["migrations"]
    moved = re.fullmatch(r"(\S+) MiB \(per group (\S+) MiB, (\S+) MiB\)", rows["KV bytes moved"])
    assert moved, rows["KV bytes moved"]
    assert (int(migrations.group(2)) > 0) == (float(moved.group(1)) > 0)
    # 30 steps checked every 10 steps: 3 periodic checks plus the final snapshot check.
    assert rows["checks"] == "4 (all passed)"
    assert "all checks passed" in out
    assert "CHECK FAILED" not in res.stderr
    assert f"plot        {plot}" in out

    data = plot.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100
    assert data[-8:-4] == b"IEND"  # the last chunk: length, "IEND", CRC
    assert len(data) > 10_000


def test_demo_without_pools_commits_only(tmp_path):
    res = run("demo", "--config", tiny_config(tmp_path, pools=False), *TINY_ARGS,
              "--steps", "20", "--check-every", "10", "--quiet", "--no-plot")  # fmt: skip
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "no pages_per_shard in the config: commits only" in res.stdout
    rows = summary_rows(res.stdout)
    assert int(rows["tokens scheduled"]) > 0
    assert "attention tokens checked" not in rows and "serving step p50 / p99" not in rows
    assert rows["checks"] == "3 (all passed)"


@pytest.mark.parametrize("command", ["info", "demo"])
def test_missing_config_fails(tmp_path, command):
    missing = tmp_path / "no-such-config.yaml"
    extra = ["--steps", "1", "--no-plot", "--quiet"] if command == "demo" else []
    res = run(command, "--config", str(missing), *extra, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: config file not found: {missing}"


def test_bad_config_key_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(LOCAL).read_text() + "bogus: 1\n")
    res = run("info", "--config", str(bad), timeout=120)
    assert res.returncode == 2
    assert "unknown config key bogus" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (
            lambda local: local + "ray:\n\ttimeout_s: 5\n",
            f", line {LOCAL_LINES + 2}: YAML syntax error",
        ),
        (lambda local: alias_bomb(), ", line 1: a: YAML anchors and aliases are not allowed"),
        (
            lambda local: local + "num_shards: 2\n",
            f"duplicate key num_shards (first at line {line_of('num_shards:')})",
        ),
        (lambda local: local.replace("{data: 8}", "{data: 1000000}"), "mesh.data must be"),
        (lambda local: local + "ray: {timeout_s: .nan}\n", "ray.timeout_s must be"),
        (lambda local: local.replace("num_shards: 4", "num_shards: 3"), "num_shards=3 must divide"),
        (
            lambda local: local.encode() + b"row_axis: \xff\n",
            f", line {LOCAL_LINES + 1}: not UTF-8 text",
        ),
    ],
    ids=["syntax", "alias-bomb", "duplicate-key", "out-of-range", "nan", "shards", "not-utf8"],
)
def test_every_bad_config_is_one_line_and_exit_2(tmp_path, body, says):
    bad = tmp_path / "bad.yaml"
    text = body((REPO / LOCAL).read_text())
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    res = run("info", "--config", str(bad), timeout=120)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: bad config {bad}: "), res.stderr
    assert says in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_unreadable_config_is_one_line_and_exit_2(tmp_path):
    res = run("info", "--config", str(tmp_path), timeout=120)  # a directory
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: cannot read config file {tmp_path}: "), res.stderr


def test_bad_arguments_are_usage_errors():
    res = run("demo", "--config", LOCAL, "--steps", "0", timeout=120)
    assert res.returncode == 2
    assert "--steps and --check-every must be positive" in res.stderr


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.chaos
def test_demo_survives_killed_shards(tmp_path):
    """``demo --kill-every``: a random shard process SIGKILLed every 8 steps on survivable
    Ray shards; each is replaced alone, the requests whose KV it held are recomputed, and
    the run still ends with every check passed."""
    path = tmp_path / "ray-tiny.yaml"
    path.write_text(
        TINY.replace("backend: local", "backend: ray").replace("{data: 8}", "{data: 4}")
        + "ray: {devices_per_shard: 1, survivable: true, timeout_s: 20}\n"
    )
    res = run("demo", "--config", str(path), *TINY_ARGS, "--steps", "24", "--check-every",
              "6", "--kill-every", "8", "--quiet", "--no-plot")  # fmt: skip
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    rows = summary_rows(res.stdout)
    assert rows["shard processes killed"] == "3 (recoveries 3)"
    assert rows["survivors restarted"] == "0"
    assert int(rows["rows whose KV was lost"].split()[0]) > 0
    assert int(rows["attention tokens checked"]) > 100
    assert rows["checks"] == "5 (all passed)"
    assert res.stdout.rstrip().endswith("all checks passed")


def test_kill_every_needs_local_ray_with_pools(tmp_path):
    res = run("demo", "--config", tiny_config(tmp_path), "--kill-every", "5", "--no-plot")
    assert res.returncode == 2
    assert "--kill-every needs the Ray backend" in res.stderr
