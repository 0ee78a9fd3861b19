#!/usr/bin/env bash
# Stops the stack started by infra/local/up.sh (moto S3 and the Ray head), by the pids it
# recorded in infra/local/.run/. Never uses `ray stop` (that would kill every Ray process of
# this user on the machine). S3 data is in memory and is lost.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="$HERE/.run"

# stop NAME PIDFILE PATTERN GRACE_SECONDS
stop() {
  local name="$1" pidfile="$2" pattern="$3" grace="$4" pid i
  if [[ ! -f "$pidfile" ]]; then
    echo "$name: not running (no pid file)"
    return 0
  fi
  pid="$(cat "$pidfile")"
  if ! [[ "$pid" =~ ^[0-9]+$ ]] || [[ ! -r "/proc/$pid/cmdline" ]] ||
    ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pattern"; then
    echo "$name: not running (stale pid file)"
    rm -f "$pidfile"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 2; i++)); do
    [[ -d "/proc/$pid" ]] || break
    sleep 0.5
  done
  if [[ -d "/proc/$pid" ]]; then
    echo "$name: still running after ${grace}s, sending SIGKILL to $pid"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "$name: stopped (pid $pid)"
}

# Ray drains the node on SIGTERM and then stops its child processes itself.
stop "Ray head" "$RUN/ray.pid" "ray start" 60
stop "moto S3" "$RUN/moto.pid" "moto_server" 10
rm -f "$HERE/env.sh"
