#!/usr/bin/env bash
# Stop the Ray node(s) that scripts/start_head.sh / scripts/start_worker.sh started, and only
# those: a node is identified by the --temp-dir it was started with.
#
#   scripts/stop.sh                          # the default temp dirs of both start scripts
#   scripts/stop.sh --temp-dir /tmp/spt-ray/head [--temp-dir DIR ...] [--grace 15]
#   SPT_TEMP_DIR=/tmp/spt-ray/worker scripts/stop.sh
#
# Options (environment variable in brackets, default after it):
#   --temp-dir DIR   [SPT_TEMP_DIR]  a node's Ray temp dir; repeatable.
#                    Default: /tmp/spt-ray/head and /tmp/spt-ray/worker (whichever exist).
#   --grace S        [SPT_STOP_GRACE, 15]  seconds of grace in all: the raylets, then the
#                    other processes, then the GCS each get a third of it between SIGTERM and
#                    SIGKILL (the order and split of `ray stop`).
#
# Why not plain `ray stop`: in Ray 2.60 `ray stop` has no scope. It sends SIGTERM to every
# process on the machine whose name looks like a Ray process (raylet, gcs_server, ray::*,
# ...), whoever started it. This script does what `ray stop` does (SIGTERM, wait the grace
# period, SIGKILL what is left) to one node's processes only: Ray's own processes whose
# command line names a session under DIR (gcs_server, raylet, monitors, dashboard) plus all of their
# descendants (core workers and agents rename themselves to ray::..., so they are found
# through their parent raylet). On a machine that runs exactly one Ray node, `ray stop` is
# equivalent.
#
# Exit status: 0 when every process of the node(s) is gone (or none was running), 1 if any
# survived SIGKILL.
set -euo pipefail

temp_dirs=()
grace=${SPT_STOP_GRACE:-15}
if [ -n "${SPT_TEMP_DIR:-}" ]; then
  temp_dirs+=("$SPT_TEMP_DIR")
fi

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    --temp-dir) temp_dirs+=("${2:?--temp-dir needs a value}"); shift 2 ;;
    --temp-dir=*) temp_dirs+=("${1#*=}"); shift ;;
    --grace) grace=${2:?--grace needs a value}; shift 2 ;;
    --grace=*) grace=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "stop.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "${#temp_dirs[@]}" -eq 0 ]; then
  temp_dirs=(/tmp/spt-ray/head /tmp/spt-ray/worker)
fi
for i in "${!temp_dirs[@]}"; do # as the start scripts record them: absolute, no trailing /
  d=${temp_dirs[$i]%/}
  case "$d" in /*) ;; *) d=$PWD/$d ;; esac
  temp_dirs[i]=$d
done
case "$grace" in
  '' | *[!0-9]*) echo "stop.sh: --grace must be a whole number of seconds, got '$grace'" >&2; exit 2 ;;
esac

# One snapshot of the process table: "pid ppid args".
snapshot() { ps -eo pid=,ppid=,args= ; }

# PIDs of one node: roots named by the session dir, then every descendant.
node_pids() {
  local dir=$1 table=$2
  local -a roots=() all=() queue=()
  local pid ppid args p
  local marker="${dir%/}/session_"
  while read -r pid ppid args; do
    [ "$pid" = "$$" ] && continue
    case "$args" in
      *"$marker"*) ;;
      *) continue ;;
    esac
    # Only Ray's own executables count (not, say, a `tail -f` on the node's logs).
    if [[ "$args" =~ ^[^[:space:]]*/(gcs_server|raylet)([[:space:]]|$) ]] ||
      [[ "$args" =~ /ray/[^[:space:]]*\.py([[:space:]]|$) ]]; then
      roots+=("$pid")
    fi
  done <<<"$table"
  [ "${#roots[@]}" -eq 0 ] && return 0
  all=("${roots[@]}")
  queue=("${roots[@]}")
  while [ "${#queue[@]}" -gt 0 ]; do
    p=${queue[0]}
    queue=("${queue[@]:1}")
    while read -r pid ppid args; do
      if [ "$ppid" = "$p" ] && [ "$pid" != "$$" ]; then
        all+=("$pid")
        queue+=("$pid")
      fi
    done <<<"$table"
  done
  printf '%s\n' "${all[@]}" | sort -un
}

# A PID counts as gone when it no longer exists or is a zombie waiting to be reaped.
alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null || true)
  [ -n "$state" ] && [ "${state:0:1}" != "Z" ]
}

# Executable name of a PID in the snapshot.
exe_of() {
  local want=$1 pid ppid args
  while read -r pid ppid args; do
    if [ "$pid" = "$want" ]; then
      args=${args%% *}
      echo "${args##*/}"
      return 0
    fi
  done <<<"$table"
}

# SIGTERM a group of PIDs, wait up to $2 seconds, SIGKILL what is left.
stop_group() {
  local name=$1 wait_s=$2
  shift 2
  [ "$#" -eq 0 ] && return 0
  local -a group=("$@") left=()
  local p deadline
  kill -TERM "${group[@]}" 2>/dev/null || true
  deadline=$((SECONDS + wait_s))
  while :; do
    left=()
    for p in "${group[@]}"; do
      if alive "$p"; then left+=("$p"); fi
    done
    [ "${#left[@]}" -eq 0 ] && return 0
    [ "$SECONDS" -ge "$deadline" ] && break
    sleep 0.2
  done
  echo "stop.sh: ${#left[@]} $name process(es) ignored SIGTERM for ${wait_s}s; SIGKILL: ${left[*]}"
  kill -KILL "${left[@]}" 2>/dev/null || true
  sleep 0.5
}

table=$(snapshot)
pids=()
for dir in "${temp_dirs[@]}"; do
  found=()
  while read -r p; do
    [ -n "$p" ] && found+=("$p")
  done < <(node_pids "$dir" "$table")
  if [ "${#found[@]}" -eq 0 ]; then
    echo "stop.sh: no Ray process of $dir is running"
    continue
  fi
  echo "stop.sh: stopping ${#found[@]} Ray process(es) of $dir"
  pids+=("${found[@]}")
done
[ "${#pids[@]}" -eq 0 ] && exit 0

# The order of `ray stop`: raylets first (their workers and agents fate-share with them),
# then every other process, then the GCS last.
raylets=()
others=()
gcs=()
for p in "${pids[@]}"; do
  case "$(exe_of "$p")" in
    raylet) raylets+=("$p") ;;
    gcs_server) gcs+=("$p") ;;
    *) others+=("$p") ;;
  esac
done
per_group=$(((grace + 2) / 3))
stop_group raylet "$per_group" "${raylets[@]}"
stop_group other "$per_group" "${others[@]}"
stop_group gcs_server "$per_group" "${gcs[@]}"

survivors=()
for p in "${pids[@]}"; do
  if alive "$p"; then survivors+=("$p"); fi
done
if [ "${#survivors[@]}" -gt 0 ]; then
  echo "stop.sh: still running after SIGKILL: ${survivors[*]}" >&2
  exit 1
fi
echo "stop.sh: stopped ${#pids[@]} process(es)"
