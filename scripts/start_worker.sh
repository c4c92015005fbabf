#!/usr/bin/env bash
# Start a worker node of a Ray cluster for sharded-pagetable: `ray start --address HEAD` with
# every port and address explicit and token authentication on.
#
#   scripts/start_worker.sh [options] [-- extra `ray start` arguments, e.g. --block]
#
# Every option can also be given as an environment variable (in brackets); a flag wins over
# the variable, the variable over the default (after the brackets).
#
#   --address HOST:PORT           [SPT_HEAD_ADDRESS] 127.0.0.1:6379   the head's GCS address
#   --node-ip-address IP          [SPT_NODE_IP] 127.0.0.1
#        Address this node's services bind to and advertise. 127.0.0.1 (the default) keeps
#        the node on loopback (a cluster on this one machine; the head must be on 127.0.0.1
#        too). On a real cluster pass the host's address on the cluster network.
#   --node-manager-port PORT      [SPT_NODE_MANAGER_PORT] 6380   raylet
#   --object-manager-port PORT    [SPT_OBJECT_MANAGER_PORT] 6381
#   --runtime-env-agent-port PORT [SPT_RUNTIME_ENV_AGENT_PORT] 6382
#   --dashboard-agent-grpc-port PORT   [SPT_DASHBOARD_AGENT_GRPC_PORT] 6383
#   --dashboard-agent-listen-port PORT [SPT_DASHBOARD_AGENT_LISTEN_PORT] 52365
#   --metrics-export-port PORT    [SPT_METRICS_EXPORT_PORT] 6384
#   --min-worker-port PORT        [SPT_MIN_WORKER_PORT] 10002    one port per worker process
#   --max-worker-port PORT        [SPT_MAX_WORKER_PORT] 19999
#        Several nodes on one machine need distinct values for all of the ports above.
#   --num-cpus N                  [SPT_NUM_CPUS] detected by Ray
#   --num-gpus N                  [SPT_NUM_GPUS] detected by Ray
#   --resources JSON              [SPT_RESOURCES] none
#        Custom resources of this node, e.g. '{"spt_host_1": 1}'.
#   --temp-dir DIR                [SPT_TEMP_DIR] /tmp/spt-ray/worker
#        Ray's temp/session dir for this node; distinct per node on one machine. It is also
#        how scripts/stop.sh finds this node's processes.
#   --token-file FILE             [SPT_TOKEN_FILE] $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token
#        The head's token (copy the head's token file here, mode 600). Not needed when
#        RAY_AUTH_TOKEN holds the token itself.
#   --python PY                   [SPT_PYTHON] this repo's .venv/bin/python, else python3
#
# Token authentication: the node starts with RAY_AUTH_MODE=token (RAY_AUTH_MODE=disabled is
# refused) and the token from RAY_AUTH_TOKEN or the token file; every process of the node
# inherits both. A node without the head's token is refused by the GCS.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

head_address=${SPT_HEAD_ADDRESS:-127.0.0.1:6379}
temp_dir=${SPT_TEMP_DIR:-/tmp/spt-ray/worker}
# shellcheck source=scripts/node_common.sh
source "$repo/scripts/node_common.sh"
die() { echo "start_worker.sh: $*" >&2; exit 2; }

while [ "$#" -gt 0 ]; do
  opt=$1
  case "$opt" in
    --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
    -h | --help | --) val= ; shift ;;
    --*) [ "$#" -ge 2 ] || die "$opt needs a value"; val=$2; shift 2 ;;
    *) die "unknown argument: $opt (see --help)" ;;
  esac
  case "$opt" in
    --address) head_address=$val ;;
    -h | --help) usage; exit 0 ;;
    --) extra=("$@"); break ;;
    *) common_option "$opt" "$val" || die "unknown option: $opt (see --help)" ;;
  esac
done

check_common
case "$head_address" in
  *:[0-9]*) ;;
  *) die "--address must be HOST:PORT of the head's GCS, got '$head_address'" ;;
esac

# --- token authentication: always on ----------------------------------------------------
if [ -n "${RAY_AUTH_MODE:-}" ] && [ "$RAY_AUTH_MODE" != token ]; then
  die "RAY_AUTH_MODE=$RAY_AUTH_MODE: this script keeps Ray token authentication on; unset it"
fi
export RAY_AUTH_MODE=token
if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
  token_source="RAY_AUTH_TOKEN (environment)"
else
  [ -s "$token_file" ] || die "no cluster token: $token_file does not exist. Copy the head's \
token file here (mode 600) and pass --token-file, or export RAY_AUTH_TOKEN=<token>"
  token_file=$(cd "$(dirname "$token_file")" && pwd)/$(basename "$token_file")
  export RAY_AUTH_TOKEN_PATH=$token_file
  token_source=$token_file
fi

# --- loopback mode ------------------------------------------------------------------------
# `ray start` rewrites 127.0.0.1 (as the node address and in --address) to the host's
# routable address, unless it believes clustering is off, and with clustering off it refuses
# to start a worker node at all. For a loopback worker we run `ray start` with clustering on
# but the address lookup answering 127.0.0.1, and clustering off for every process the node
# spawns (they inherit RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and so stay on loopback too).
launcher='import sys; from ray.scripts.scripts import main; sys.argv[0] = "ray"; sys.exit(main())'
case "$node_ip" in
  127.0.0.1 | localhost)
    node_ip=127.0.0.1
    case "${head_address%:*}" in
      127.0.0.1 | localhost) head_address=127.0.0.1:${head_address##*:} ;;
      *) die "a loopback worker (--node-ip-address 127.0.0.1) needs a loopback head, got $head_address" ;;
    esac
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    launcher='import sys
import ray._private.ray_constants as ray_constants
import ray._private.services as services
from ray.scripts.scripts import main
ray_constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"
sys.argv[0] = "ray"
sys.exit(main())'
    ;;
  *) unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ;; # a real cluster: Ray's defaults
esac

if ps -eo args= | grep -F -- "$temp_dir/session_" | grep -qE '(^|/)(gcs_server|raylet) '; then
  die "a Ray node is already running in $temp_dir (stop it: scripts/stop.sh --temp-dir $temp_dir)"
fi
mkdir -p "$temp_dir"

args=(
  start
  --address "$head_address"
  --node-ip-address "$node_ip"
  --node-manager-port "$node_manager_port"
  --object-manager-port "$object_manager_port"
  --runtime-env-agent-port "$runtime_env_agent_port"
  --dashboard-agent-grpc-port "$dashboard_agent_grpc_port"
  --dashboard-agent-listen-port "$dashboard_agent_listen_port"
  --metrics-export-port "$metrics_export_port"
  --min-worker-port "$min_worker_port"
  --max-worker-port "$max_worker_port"
  --temp-dir "$temp_dir"
  --disable-usage-stats
)
[ -n "$num_cpus" ] && args+=(--num-cpus "$num_cpus")
[ -n "$num_gpus" ] && args+=(--num-gpus "$num_gpus")
[ -n "$resources" ] && args+=(--resources "$resources")
args+=("${extra[@]}")

echo "start_worker.sh: ray ${args[*]}"
"$python" -c "$launcher" "${args[@]}"

cat <<EOF
start_worker.sh: worker node up
  head         $head_address
  node         $node_ip   temp dir $temp_dir
  token        $token_source
stop:
  scripts/stop.sh --temp-dir $temp_dir
EOF
