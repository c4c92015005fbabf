# Shared by scripts/start_head.sh and scripts/start_worker.sh (sourced, not run): the
# defaults, options and checks every Ray node of this project has. The caller sets `die`.

node_ip=${SPT_NODE_IP:-127.0.0.1}
node_manager_port=${SPT_NODE_MANAGER_PORT:-6380}
object_manager_port=${SPT_OBJECT_MANAGER_PORT:-6381}
runtime_env_agent_port=${SPT_RUNTIME_ENV_AGENT_PORT:-6382}
dashboard_agent_grpc_port=${SPT_DASHBOARD_AGENT_GRPC_PORT:-6383}
dashboard_agent_listen_port=${SPT_DASHBOARD_AGENT_LISTEN_PORT:-52365}
metrics_export_port=${SPT_METRICS_EXPORT_PORT:-6384}
min_worker_port=${SPT_MIN_WORKER_PORT:-10002}
max_worker_port=${SPT_MAX_WORKER_PORT:-19999}
num_cpus=${SPT_NUM_CPUS:-}
num_gpus=${SPT_NUM_GPUS:-}
resources=${SPT_RESOURCES:-}
token_file=${SPT_TOKEN_FILE:-${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}}
python=${SPT_PYTHON:-}
extra=()
# The shard actors this node runs import the project from the checkout (as scripts/dev.sh
# does); a node with the project pip-installed finds it either way.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

# common_option OPT VAL: set the variable of a node option every script takes; fails for
# any other option.
common_option() {
  case "$1" in
    --node-ip-address) node_ip=$2 ;;
    --node-manager-port) node_manager_port=$2 ;;
    --object-manager-port) object_manager_port=$2 ;;
    --runtime-env-agent-port) runtime_env_agent_port=$2 ;;
    --dashboard-agent-grpc-port) dashboard_agent_grpc_port=$2 ;;
    --dashboard-agent-listen-port) dashboard_agent_listen_port=$2 ;;
    --metrics-export-port) metrics_export_port=$2 ;;
    --min-worker-port) min_worker_port=$2 ;;
    --max-worker-port) max_worker_port=$2 ;;
    --num-cpus) num_cpus=$2 ;;
    --num-gpus) num_gpus=$2 ;;
    --resources) resources=$2 ;;
    --temp-dir) temp_dir=$2 ;;
    --token-file) token_file=$2 ;;
    --python) python=$2 ;;
    *) return 1 ;;
  esac
}

# check_common PORT_VAR...: pick the python, validate the common ports and any extra port
# variables named, and make temp_dir absolute.
check_common() {
  if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
  fi
  local p
  for p in node_manager_port object_manager_port runtime_env_agent_port \
    dashboard_agent_grpc_port dashboard_agent_listen_port metrics_export_port \
    min_worker_port max_worker_port "$@"; do
    case "${!p}" in
      '' | *[!0-9]*) die "${p//_/-} must be a port number, got '${!p}'" ;;
    esac
  done
  [ "$min_worker_port" -le "$max_worker_port" ] || die "min worker port > max worker port"
  temp_dir=${temp_dir%/}
  case "$temp_dir" in /*) ;; *) temp_dir=$PWD/$temp_dir ;; esac
}
