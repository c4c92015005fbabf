#!/usr/bin/env bash
# Start the head node of a Ray cluster for sharded-pagetable: `ray start --head` with every
# port and address explicit and token authentication on.
#
#   scripts/start_head.sh [options] [-- extra `ray start` arguments, e.g. --block]
#
# Every option can also be given as an environment variable (in brackets); a flag wins over
# the variable, the variable over the default (after the brackets).
#
#   --node-ip-address IP          [SPT_NODE_IP] 127.0.0.1
#        Address this node's services bind to and advertise. 127.0.0.1 (the default) keeps
#        the whole node on loopback: only a cluster of nodes on this one machine can form.
#        On a real cluster pass the host's address on the cluster network.
#   --port PORT                   [SPT_GCS_PORT] 6379            GCS; the cluster address
#   --node-manager-port PORT      [SPT_NODE_MANAGER_PORT] 6380   raylet
#   --object-manager-port PORT    [SPT_OBJECT_MANAGER_PORT] 6381
#   --runtime-env-agent-port PORT [SPT_RUNTIME_ENV_AGENT_PORT] 6382
#   --dashboard-agent-grpc-port PORT   [SPT_DASHBOARD_AGENT_GRPC_PORT] 6383
#   --dashboard-agent-listen-port PORT [SPT_DASHBOARD_AGENT_LISTEN_PORT] 52365
#   --metrics-export-port PORT    [SPT_METRICS_EXPORT_PORT] 6384
#   --min-worker-port PORT        [SPT_MIN_WORKER_PORT] 10002    one port per worker process
#   --max-worker-port PORT        [SPT_MAX_WORKER_PORT] 19999
#   --ray-client-server-port PORT [SPT_CLIENT_PORT] 10001
#        Ray Client (ray://) server. Needs `ray[client]` (grpcio); when that is not installed
#        the server is not started and the flag is not passed. "none" never starts it.
#   --dashboard-host HOST         [SPT_DASHBOARD_HOST] 127.0.0.1
#        The dashboard is bound to loopback unless you ask otherwise here (e.g. 0.0.0.0 to
#        reach it from other machines; it then requires the token too).
#   --dashboard-port PORT         [SPT_DASHBOARD_PORT] 8265
#   --dashboard | --no-dashboard  [SPT_DASHBOARD=1|0] auto: started when Ray's dashboard
#        dependencies (`ray[default]`) are installed.
#   --num-cpus N                  [SPT_NUM_CPUS] detected by Ray
#   --num-gpus N                  [SPT_NUM_GPUS] detected by Ray
#   --resources JSON              [SPT_RESOURCES] none
#        Custom resources of this node, e.g. '{"spt_host_0": 1}'.
#   --temp-dir DIR                [SPT_TEMP_DIR] /tmp/spt-ray/head
#        Ray's temp/session dir for this node (keep it short: Unix socket paths live in it).
#        It is also how scripts/stop.sh finds this node's processes.
#   --token-file FILE             [SPT_TOKEN_FILE] $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token
#        Created (256 random bits, mode 600) when it does not exist. Ignored when
#        RAY_AUTH_TOKEN holds the token itself.
#   --python PY                   [SPT_PYTHON] this repo's .venv/bin/python, else python3
#
# Token authentication. Ray 2.60 turns it on by default only for a cluster that `ray.init()`
# starts itself; `ray start --head` turns it on only if RAY_AUTH_MODE=token or a token file
# already exists. This script always starts the head with RAY_AUTH_MODE=token and refuses
# RAY_AUTH_MODE=disabled. Every worker node and every driver then needs the same token:
#   - copy the token file to each machine (mode 600) and point RAY_AUTH_TOKEN_PATH at it, or
#     put it at ~/.ray/auth_token there, or export RAY_AUTH_TOKEN="$(cat FILE)";
#   - set RAY_AUTH_MODE=token in drivers: Ray enables auth on its own only for a driver that
#     finds a cluster started on its machine with address "auto" and no RAY_ADDRESS; with an
#     explicit address (argument or RAY_ADDRESS) it does not, and the GCS refuses the driver.
# The exports drivers need are written to DIR/spt-cluster.env (no secret in it: the token
# file's path only).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

gcs_port=${SPT_GCS_PORT:-6379}
client_port=${SPT_CLIENT_PORT:-10001}
dashboard_host=${SPT_DASHBOARD_HOST:-127.0.0.1}
dashboard_port=${SPT_DASHBOARD_PORT:-8265}
dashboard=${SPT_DASHBOARD:-auto}
temp_dir=${SPT_TEMP_DIR:-/tmp/spt-ray/head}
# shellcheck source=scripts/node_common.sh
source "$repo/scripts/node_common.sh"
die() { echo "start_head.sh: $*" >&2; exit 2; }

while [ "$#" -gt 0 ]; do
  opt=$1
  case "$opt" in
    --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
    --dashboard | --no-dashboard | -h | --help | --) val= ; shift ;;
    --*) [ "$#" -ge 2 ] || die "$opt needs a value"; val=$2; shift 2 ;;
    *) die "unknown argument: $opt (see --help)" ;;
  esac
  case "$opt" in
    --port) gcs_port=$val ;;
    --ray-client-server-port) client_port=$val ;;
    --dashboard-host) dashboard_host=$val ;;
    --dashboard-port) dashboard_port=$val ;;
    --dashboard) dashboard=1 ;;
    --no-dashboard) dashboard=0 ;;
    -h | --help) usage; exit 0 ;;
    --) extra=("$@"); break ;;
    *) common_option "$opt" "$val" || die "unknown option: $opt (see --help)" ;;
  esac
done

check_common gcs_port dashboard_port
case "$dashboard" in 0 | 1 | auto) ;; *) die "SPT_DASHBOARD must be 0, 1 or auto" ;; esac

# --- token authentication: always on ----------------------------------------------------
if [ -n "${RAY_AUTH_MODE:-}" ] && [ "$RAY_AUTH_MODE" != token ]; then
  die "RAY_AUTH_MODE=$RAY_AUTH_MODE: this script keeps Ray token authentication on; unset it"
fi
export RAY_AUTH_MODE=token
if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
  token_source="RAY_AUTH_TOKEN (environment)"
else
  if [ ! -s "$token_file" ]; then
    mkdir -p "$(dirname "$token_file")"
    (umask 077 && "$python" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$token_file")
    echo "start_head.sh: created a new cluster token in $token_file"
  fi
  token_file=$(cd "$(dirname "$token_file")" && pwd)/$(basename "$token_file")
  export RAY_AUTH_TOKEN_PATH=$token_file
  token_source=$token_file
fi

# --- loopback mode ------------------------------------------------------------------------
# Ray rewrites 127.0.0.1 to the host's routable address unless it believes clustering is off,
# which it reads from this variable (inherited by every process of the node).
loopback=0
case "$node_ip" in
  127.0.0.1 | localhost) loopback=1; node_ip=127.0.0.1; export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ;;
  *) unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ;; # a real cluster: Ray's defaults
esac

# Refuse to start a second node in the same temp dir.
if ps -eo args= | grep -F -- "$temp_dir/session_" | grep -qE '(^|/)(gcs_server|raylet) '; then
  die "a Ray node is already running in $temp_dir (stop it: scripts/stop.sh --temp-dir $temp_dir)"
fi
mkdir -p "$temp_dir"

args=(
  start --head
  --node-ip-address "$node_ip"
  --port "$gcs_port"
  --node-manager-port "$node_manager_port"
  --object-manager-port "$object_manager_port"
  --runtime-env-agent-port "$runtime_env_agent_port"
  --dashboard-agent-grpc-port "$dashboard_agent_grpc_port"
  --dashboard-agent-listen-port "$dashboard_agent_listen_port"
  --metrics-export-port "$metrics_export_port"
  --min-worker-port "$min_worker_port"
  --max-worker-port "$max_worker_port"
  --dashboard-host "$dashboard_host"
  --dashboard-port "$dashboard_port"
  --temp-dir "$temp_dir"
  --disable-usage-stats
)
case "$dashboard" in
  0) args+=(--include-dashboard false) ;;
  1) args+=(--include-dashboard true) ;;
esac
if [ "$client_port" != none ]; then
  if "$python" -c 'import grpc' 2>/dev/null; then
    args+=(--ray-client-server-port "$client_port")
  else
    echo "start_head.sh: ray[client] (grpcio) is not installed: no Ray Client server (ray://)"
    client_port=none
  fi
fi
[ -n "$num_cpus" ] && args+=(--num-cpus "$num_cpus")
[ -n "$num_gpus" ] && args+=(--num-gpus "$num_gpus")
[ -n "$resources" ] && args+=(--resources "$resources")
args+=("${extra[@]}")

address=$node_ip:$gcs_port
echo "start_head.sh: ray ${args[*]}"
"$python" -c 'import sys; from ray.scripts.scripts import main; sys.argv[0] = "ray"; sys.exit(main())' \
  "${args[@]}"

env_file=$temp_dir/spt-cluster.env
{
  echo "# Source this in a driver shell to use the cluster started by scripts/start_head.sh."
  echo "export RAY_ADDRESS=$address"
  echo "export RAY_AUTH_MODE=token"
  if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"; fi
  if [ "$loopback" = 1 ]; then echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"; fi
} >"$env_file"

if [ "$loopback" = 1 ]; then
  worker_hint="SPT_HEAD_ADDRESS=$address SPT_TOKEN_FILE=$token_source scripts/start_worker.sh \
--temp-dir <own dir> <distinct ports: see scripts/launch_local_cluster.sh>"
else
  worker_hint="SPT_HEAD_ADDRESS=$address SPT_TOKEN_FILE=<copy of the token file> \
scripts/start_worker.sh --node-ip-address <the worker's IP>"
fi
cat <<EOF
start_head.sh: head node up
  address      $address
  temp dir     $temp_dir
  token        $token_source
  client       $([ "$client_port" = none ] && echo "not started" || echo "ray://$node_ip:$client_port")
workers (copy the token file to each machine first):
  $worker_hint
drivers:
  source $env_file    # RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH
  python -m sharded_pagetable demo --config configs/ray-cluster.yaml
stop:
  scripts/stop.sh --temp-dir $temp_dir
EOF
