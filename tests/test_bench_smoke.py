"""Smoke test: the benchmark script runs end to end in quick mode (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """``scripts/NAME.py --quick ARGS`` in the project's environment; must exit 0."""
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
    proc = subprocess.run(
        [str(python), str(ROOT / "scripts" / f"{name}.py"), "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_bench_page_table_quick(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = run_script("bench_page_table", "--json", str(out_json))
    assert "c. targets" in proc.stdout
    assert "targets: " in proc.stdout and " PASS" in proc.stdout
    doc = json.loads(out_json.read_text())
    assert {"meta", "per_op", "commit", "targets"} <= doc.keys()
    assert all(op in doc["per_op"] for op in ("append_row", "move_row", "swap_row"))
    assert all(r["same_state"] for r in doc["per_op"].values())


def test_bench_serving_quick(tmp_path: Path) -> None:
    out_json = tmp_path / "serving.json"
    proc = run_script("bench_serving", "--json", str(out_json))
    assert "target commit with schedule <= 1.3x" in proc.stdout
    assert "noisy" in proc.stdout
    doc = json.loads(out_json.read_text())
    assert {"meta", "step", "migration", "targets"} <= doc.keys()
    assert not doc["errors"]
    (step,) = doc["step"]  # --quick: the local backend only
    assert step["step_inputs_match"]
    assert all(step[k]["p50_us"] > 0 for k in ("a", "c", "d", "c_sync", "d_sync"))
    assert [m["pages"] for m in doc["migration"]] == doc["meta"]["migrate_pages"]
    assert all(m["copy_correct"] for m in doc["migration"])


def test_bench_scale_quick(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "scale.json", tmp_path / "scale.png"
    proc = run_script("bench_scale", "--json", str(out_json), "--png", str(out_png))
    out = proc.stdout
    assert "target coordinator cost grows" in out and "target coordinator cost <=" in out
    # a, b, and e's three: one touched shard at 64 shards (local, in-process), per touched shard
    assert out.count(" -> PASS") + out.count(" -> MISS") == 5
    assert "floor: loopback TCP echo" in out and "sum of the parts" in out
    doc = json.loads(out_json.read_text())
    assert {"meta", "shards", "sizes", "ray", "breakdown", "targets", "touched"} <= doc.keys()
    touched = doc["touched"]
    for key in ("local-one", "instant-one", "instant-every"):
        assert [r["shards"] for r in touched[key]] == [4, 16, 64]
        assert all(r["cpu_p50_us"] > 0 for r in touched[key])
    assert [r["shards"] for r in doc["shards"]["rows"]] == [1, 2, 4, 8]
    assert len(doc["sizes"]["rows"]) == 2 and doc["ray"] == []
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_construction_quick() -> None:
    out = run_script("bench_construction").stdout
    arrays = {}  # table -> device arrays its 16 host-only instances hold
    for line in out.splitlines():
        if line.strip().startswith(("MultiGroupPageTable", "ShardedPageTable")):
            name, _ms, count = line.strip().rsplit(None, 2)
            arrays[name] = int(count)
    assert len(arrays) == 3, out
    # Used on the host only: the sharded tables hold no device array (nothing started).
    assert arrays.pop("MultiGroupPageTable") > 0 and set(arrays.values()) == {0}, out
