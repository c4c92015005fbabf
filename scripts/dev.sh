#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs the project, then runs
#   scripts/dev.sh demo [ARGS]   the main job (python -m sharded_pagetable demo ARGS)
#   scripts/dev.sh test [ARGS]   lint, format check and the whole pytest suite
#   scripts/dev.sh bench NAME    a benchmark script from scripts/ (bench_page_table, bench_sharded)
#   scripts/dev.sh run CMD...    any command inside the environment
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "sharded-pagetable needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "installing sharded-pagetable and its dependencies into .venv (first run only)..."
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v 'is ignored' || true
  # The project runs from this checkout (PYTHONPATH below, which Ray's workers inherit), so
  # only its dependencies are installed: no build step, and no stale installed copy.
  .venv/bin/python - <<'PY' > .venv/requirements.txt
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
PY
  .venv/bin/python -m pip install -q -r .venv/requirements.txt 2>&1 | grep -v 'is ignored' || true
  .venv/bin/python -c 'import jax, ray, msgpack, yaml, numba, prometheus_client, hypothesis, pytest' || {
    echo "installation failed" >&2
    exit 1
  }
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

cmd=${1:-demo}
shift || true
case "$cmd" in
  demo) exec python -m sharded_pagetable demo "$@" ;;
  test)
    ruff check .
    ruff format --check .
    exec python -m pytest "$@"
    ;;
  bench) name=$1; shift; exec python "scripts/$name.py" "$@" ;;
  run) exec "$@" ;;
  *) echo "usage: scripts/dev.sh {demo|test|bench NAME|run CMD...} [ARGS]" >&2; exit 2 ;;
esac
