"""Every Python block of README.md runs as printed, on the default device count.

Each ```python block (indented ones inside list items too) runs in a fresh interpreter from
the repository's root with ``JAX_PLATFORMS=cpu`` and no device-count setting, so it sees
the one CPU device an ordinary machine has (not the 8 this test session forces). A block
preceded by ``<!-- readme-test: skip (why) -->`` is a fragment and is not run; other
languages (bash, plain output) are not Python and are not run either.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line, code)`` of every ```python block not marked skip."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        i += 1
        body = []
        while i < len(lines) and not re.match(rf"^{indent}```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        if lang == "python" and not SKIP.search(before):
            blocks.append((start + 1, textwrap.dedent("\n".join(body)) + "\n"))
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_the_blocks_it_promises():
    text = README.read_text()
    assert len(BLOCKS) >= 6
    assert any("ShardedPageTable as MultiGroupPageTable" in code for _, code in BLOCKS)
    assert any("run_on_shards(model_step, step=True)" in code for _, code in BLOCKS)
    assert "## Using it in a serving engine" in text
    skipped = len(SKIP.findall(text))
    assert skipped <= 2, "skip only fragments that cannot run"


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line{n}" for n, _ in BLOCKS])
def test_readme_block_runs_as_printed_on_the_default_device_count(line, code):
    env = {
        k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SHARDED_PAGETABLE_CONFIG")
    }
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    check = "import jax; assert len(jax.devices()) == 1, jax.devices()\n"
    res = subprocess.run(
        [sys.executable, "-c", check + code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, f"README.md block at line {line} failed:\n{res.stderr[-3000:]}"
