#!/usr/bin/env bash
# A three-node Ray cluster on this one machine, end to end: start a head and two workers
# (scripts/start_head.sh, scripts/start_worker.sh: separate Ray nodes with their own temp dir,
# ports and custom resource, all bound to 127.0.0.1, token authentication on), wait until the
# three nodes are alive, run the demo against the cluster's address with one shard per node
# (configs/ray-cluster-local.yaml, placement: spread), then stop every node (trap on EXIT,
# also on failure or Ctrl-C) and check that no process of this cluster is left.
#
#   scripts/launch_local_cluster.sh [-- extra demo arguments, e.g. --seed 3 --quiet]
#
# Environment (defaults after the colon):
#   SPT_STEPS: 150                demo steps (enough to fill more than one shard)
#   SPT_CONFIG: configs/ray-cluster-local.yaml
#   SPT_BASE_PORT: auto           first port of a block of 300 (node i uses base+100*i ...);
#                                 auto takes the first free block from 24000 up
#   SPT_WAIT_S: 120               how long the three nodes may take to come up
#   SPT_DEMO_TIMEOUT: 900         the demo is stopped after this many seconds
#   SPT_KEEP_TEMP: 0              1 keeps the temp dir (logs) after a successful run; a failed
#                                 run always keeps it
#   SPT_PYTHON: .venv/bin/python
#
# Exit status: the demo's, or 1 if the cluster did not come up or a process was left behind.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the project runs from this checkout
cd "$repo"
python=${SPT_PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3
steps=${SPT_STEPS:-150}
config=${SPT_CONFIG:-configs/ray-cluster-local.yaml}
wait_s=${SPT_WAIT_S:-120}
demo_timeout=${SPT_DEMO_TIMEOUT:-900}
extra=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --) shift; extra=("$@"); break ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "launch_local_cluster.sh: unknown argument $1 (demo arguments go after --)" >&2; exit 2 ;;
  esac
done

# This cluster's own token and address only: nothing inherited from the calling shell.
unset RAY_ADDRESS RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH RAY_AUTH_MODE SPT_TEMP_DIR SPT_TOKEN_FILE

root=$(mktemp -d /tmp/spt-cluster.XXXXXX) # short: Ray's Unix socket paths live below it
head_dir=$root/head
worker_dirs=("$root/worker1" "$root/worker2")
token=$root/auth_token
# A process of this cluster is found three ways: its command line names the temp dir (gcs_server,
# raylet, monitors), it has a file open below the temp dir (every Ray process logs there,
# including agents and workers that renamed themselves to ray::...), or it carries
# SPT_LAUNCH_ID=$root in its environment (set for every command this script starts).
marker="SPT_LAUNCH_ID=$root"

alive_pid() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null || true)
  [ -n "$state" ] && [ "${state:0:1}" != Z ]
}

leftovers() { # "pid args" of every live process of this cluster
  local table pid args f
  local -a found=()
  table=$(ps -eo pid=,args=)
  while read -r pid args; do
    case "$args" in *"$root"*) found+=("$pid") ;; esac
  done <<<"$table"
  while read -r pid; do
    [ -n "$pid" ] && found+=("$pid")
  done < <(find /proc/[0-9]*/fd -maxdepth 1 -lname "$root/*" 2>/dev/null | cut -d/ -f3 | sort -u)
  for f in /proc/[0-9]*/environ; do
    if { tr '\0' '\n' <"$f"; } 2>/dev/null | grep -qxF -- "$marker"; then
      pid=${f#/proc/}
      found+=("${pid%/environ}")
    fi
  done
  for pid in $(printf '%s\n' "${found[@]}" | sort -un); do
    [ "$pid" = "$$" ] && continue
    if alive_pid "$pid"; then echo "  $pid $(ps -o args= -p "$pid" | cut -c1-120)"; fi
  done
  return 0
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  echo "== stopping the cluster"
  "$repo/scripts/stop.sh" --temp-dir "${worker_dirs[1]}" --temp-dir "${worker_dirs[0]}" \
    --temp-dir "$head_dir"
  [ $? -eq 0 ] || rc=1
  left=$(leftovers)
  if [ -n "$left" ]; then
    echo "LEFT BEHIND (processes of this cluster still running):"
    echo "$left"
    rc=1
  else
    echo "== no process of this cluster is left (checked: command lines naming $root, open files below it, $marker)"
  fi
  rm -f "$token"
  if [ "$rc" -eq 0 ] && [ "${SPT_KEEP_TEMP:-0}" != 1 ]; then
    rm -rf "$root"
  else
    echo "logs kept in $root"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- ports: one block of 100 per node, all free on 127.0.0.1 -----------------------------
ports_of() { # base, node index -> the ports that node binds (head: also GCS, client, dashboard)
  local b=$(($1 + 100 * $2))
  echo $((b + 1)) $((b + 2)) $((b + 3)) $((b + 4)) $((b + 5)) $((b + 6))
  [ "$2" -eq 0 ] && echo "$b" $((b + 7)) $((b + 8))
  seq $((b + 20)) $((b + 79))
}
all_free() {
  "$python" -c '
import socket, sys
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            sys.exit(1)' "$@"
}
if [ -n "${SPT_BASE_PORT:-}" ]; then
  base=$SPT_BASE_PORT
  # shellcheck disable=SC2046
  all_free $(ports_of "$base" 0) $(ports_of "$base" 1) $(ports_of "$base" 2) ||
    { echo "ports $base..$((base + 299)) are not all free on 127.0.0.1" >&2; exit 1; }
else
  base=
  for candidate in 24000 24300 24600 24900 25200 25500 25800 26100; do
    # shellcheck disable=SC2046
    if all_free $(ports_of "$candidate" 0) $(ports_of "$candidate" 1) $(ports_of "$candidate" 2); then
      base=$candidate
      break
    fi
  done
  [ -n "$base" ] || { echo "no free block of 300 ports in 24000..26399 on 127.0.0.1" >&2; exit 1; }
fi
address=127.0.0.1:$base

node_args() { # node index -> start script flags for its ports
  local b=$((base + 100 * $1))
  echo --node-manager-port $((b + 1)) --object-manager-port $((b + 2)) \
    --runtime-env-agent-port $((b + 3)) --dashboard-agent-grpc-port $((b + 4)) \
    --dashboard-agent-listen-port $((b + 5)) --metrics-export-port $((b + 6)) \
    --min-worker-port $((b + 20)) --max-worker-port $((b + 79))
}

run_logged() { # name, command...: run, output to $root/name.log; show it if the command fails
  local name=$1
  shift
  if ! "$@" >"$root/$name.log" 2>&1; then
    echo "$name failed; its output:" >&2
    cat "$root/$name.log" >&2
    return 1
  fi
  grep -E '^(start_head|start_worker)\.sh: ray ' "$root/$name.log" | cut -c1-150 || true
}

echo "== cluster in $root, GCS at $address, token $token"
# shellcheck disable=SC2046
run_logged head env "$marker" SPT_TOKEN_FILE="$token" SPT_PYTHON="$python" \
  timeout 180 scripts/start_head.sh --node-ip-address 127.0.0.1 --port "$base" \
  --ray-client-server-port $((base + 7)) --dashboard-port $((base + 8)) \
  $(node_args 0) --num-cpus 1 --resources '{"spt_node_0": 1}' --temp-dir "$head_dir"
for i in 1 2; do
  # shellcheck disable=SC2046
  run_logged "worker$i" env "$marker" SPT_TOKEN_FILE="$token" SPT_PYTHON="$python" \
    timeout 180 scripts/start_worker.sh --address "$address" --node-ip-address 127.0.0.1 \
    $(node_args "$i") --num-cpus 1 --resources "{\"spt_node_$i\": 1}" \
    --temp-dir "${worker_dirs[$((i - 1))]}"
done

# Drivers of this cluster: its address, token auth with its token, loopback addresses kept.
driver=(env RAY_ADDRESS="$address" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token"
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$marker")

echo "== waiting for 3 alive nodes"
"${driver[@]}" timeout --foreground $((wait_s + 60)) "$python" -c '
import sys, time
import ray
address, want, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, log_to_driver=False, logging_level="error", configure_logging=False)
deadline = time.monotonic() + wait_s
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want:
        break
    if time.monotonic() > deadline:
        sys.exit(f"only {len(alive)} of {want} nodes alive after {wait_s:.0f}s")
    time.sleep(0.5)
for n in sorted(alive, key=lambda n: n["NodeManagerPort"]):
    res = n["Resources"]
    custom = sorted(k for k in res if k.startswith("spt_node"))
    where = "{}:{}".format(n["NodeManagerAddress"], n["NodeManagerPort"])
    print("  node", n["NodeID"][:12], where, "CPU", res.get("CPU", 0), custom)
ray.shutdown()
' "$address" 3 "$wait_s"

echo "== demo: python -m sharded_pagetable demo --config $config --steps $steps --address $address"
set +e
"${driver[@]}" timeout --foreground --kill-after=30 "$demo_timeout" "$python" -m sharded_pagetable \
  demo --config "$config" --steps "$steps" --address "$address" --plot out/cluster-demo.png \
  "${extra[@]}"
demo_rc=$?
set -e
echo "== demo exit status $demo_rc"
exit "$demo_rc"
