"""Smoke test: the benchmark script runs end to end in quick mode (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def test_bench_page_table_quick(tmp_path: Path) -> None:
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            str(python),
            str(ROOT / "scripts" / "bench_page_table.py"),
            "--quick",
            "--json",
            str(out_json),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "c. targets" in proc.stdout
    assert "targets: " in proc.stdout and " PASS" in proc.stdout
    doc = json.loads(out_json.read_text())
    assert {"meta", "per_op", "commit", "targets"} <= doc.keys()
    assert all(op in doc["per_op"] for op in ("append_row", "move_row", "swap_row"))
    assert all(r["same_state"] for r in doc["per_op"].values())
