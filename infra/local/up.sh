#!/usr/bin/env bash
# Local dev stack for `make demo`: a moto S3 server and a single-node Ray head, both bound to
# 127.0.0.1 only. Idempotent: a running stack is reused. Stop it with infra/local/down.sh.
#
# Settings (environment):
#   VENV                       venv with ray[default,data] and moto[server]   (.venv)
#   EZMIA_S3_PORT              moto S3 port                                   (9700)
#   EZMIA_BUCKETS              buckets to create, space/comma separated       (ezmia-demo)
#   EZMIA_RAY_PORT             Ray GCS port                                   (6379)
#   EZMIA_RAY_DASHBOARD_PORT   Ray dashboard / job API port                   (8265)
#   EZMIA_RAY_CPUS             logical CPUs of the Ray head                   (2)
#   EZMIA_RAY_OBJECT_STORE_MB  Ray object store size                          (300)
#   EZMIA_RAY_TMPDIR           Ray temp/session dir (short path: Unix sockets) (/tmp/ezmia-ray-$UID)
#
# Writes infra/local/env.sh (source it) and keeps pids/logs in infra/local/.run/.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

VENV="${VENV:-.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "up.sh: no venv at $VENV (set VENV=...)" >&2
  exit 1
fi
VENV_BIN="$(cd "$VENV/bin" && pwd)"
for tool in python ray moto_server; do
  if [[ ! -x "$VENV_BIN/$tool" ]]; then
    echo "up.sh: $VENV_BIN/$tool missing (pip install 'ray[default,data]' 'moto[server]')" >&2
    exit 1
  fi
done

HOST=127.0.0.1
S3_PORT="${EZMIA_S3_PORT:-9700}"
BUCKETS="${EZMIA_BUCKETS:-ezmia-demo}"
RAY_PORT="${EZMIA_RAY_PORT:-6379}"
DASH_PORT="${EZMIA_RAY_DASHBOARD_PORT:-8265}"
RAY_CPUS="${EZMIA_RAY_CPUS:-2}"
OBJ_MB="${EZMIA_RAY_OBJECT_STORE_MB:-300}"
RAY_TMP="${EZMIA_RAY_TMPDIR:-/tmp/ezmia-ray-$(id -u)}"

RUN="$HERE/.run"
mkdir -p "$RUN"

# Loopback only: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray resolves 127.0.0.1 to the
# machine's external address in places; usage stats would phone home.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
# Local endpoints must never go through an HTTP proxy.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"
# Job drivers run `python` from the head's PATH: make it the venv's.
export PATH="$VENV_BIN:$PATH"
# Token auth for the GCS and the job API. Ray 2.60 turns it on by itself whenever
# ~/.ray/auth_token exists, so be explicit: same behaviour on every machine, and the token is
# this stack's own (.run/auth_token, mode 600). Clients need both variables (env.sh has them).
TOKEN_FILE="$RUN/auth_token"
if [[ ! -s "$TOKEN_FILE" ]]; then
  (umask 077 && "$VENV_BIN/python" -c 'import secrets; print(secrets.token_hex(32), end="")' \
    >"$TOKEN_FILE")
fi
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"

# pid_alive PIDFILE PATTERN: the pid in PIDFILE runs and its command line contains PATTERN
# (guards against a recycled pid).
pid_alive() {
  local pidfile="$1" pattern="$2" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pattern"
}

# answers URL: any HTTP response within 2 s.
answers() {
  "$VENV_BIN/python" - "$1" <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2).read()
except urllib.error.HTTPError:
    pass  # an HTTP error is still an answer
except Exception:
    sys.exit(1)
PY
}

port_in_use() {
  "$VENV_BIN/python" - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers don't count
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
finally:
    s.close()
sys.exit(1)
PY
}

wait_for() {  # wait_for URL SECONDS PIDFILE PATTERN LOG
  local url="$1" secs="$2" pidfile="$3" pattern="$4" log="$5" i
  for ((i = 0; i < secs * 2; i++)); do
    if answers "$url"; then return 0; fi
    if ! pid_alive "$pidfile" "$pattern"; then
      echo "up.sh: process for $url exited; log $log:" >&2
      tail -n 30 "$log" >&2 || true
      return 1
    fi
    sleep 0.5
  done
  echo "up.sh: $url did not answer within ${secs}s; log $log" >&2
  return 1
}

# ---- S3 (moto) ----------------------------------------------------------------------------
S3_URL="http://$HOST:$S3_PORT"
if pid_alive "$RUN/moto.pid" "moto_server" && answers "$S3_URL/moto-api/"; then
  echo "moto S3 already running at $S3_URL (pid $(cat "$RUN/moto.pid"))"
else
  if port_in_use "$S3_PORT"; then
    echo "up.sh: port $S3_PORT is taken by something else (set EZMIA_S3_PORT)" >&2
    exit 1
  fi
  setsid "$VENV_BIN/moto_server" -H "$HOST" -p "$S3_PORT" \
    >"$RUN/moto.log" 2>&1 </dev/null &
  echo $! >"$RUN/moto.pid"
  wait_for "$S3_URL/moto-api/" 30 "$RUN/moto.pid" "moto_server" "$RUN/moto.log"
  echo "moto S3 started at $S3_URL (pid $(cat "$RUN/moto.pid"), in-memory: data is lost on stop)"
fi

# ---- Ray head -----------------------------------------------------------------------------
# Ray processes inherit these, so every job on this head talks to the local S3 by default.
export AWS_ENDPOINT_URL="$S3_URL" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
DASH_URL="http://$HOST:$DASH_PORT"
if pid_alive "$RUN/ray.pid" "ray start" && answers "$DASH_URL/api/version"; then
  echo "Ray head already running, dashboard $DASH_URL (pid $(cat "$RUN/ray.pid"))"
else
  for p in "$RAY_PORT" "$DASH_PORT"; do
    if port_in_use "$p"; then
      echo "up.sh: port $p is taken (set EZMIA_RAY_PORT / EZMIA_RAY_DASHBOARD_PORT)" >&2
      exit 1
    fi
  done
  mkdir -p "$RAY_TMP"
  # --block keeps `ray start` in the foreground as the parent of every Ray process: one pid
  # to stop (SIGTERM makes it shut the node down), and no `ray stop`, which would kill every
  # Ray process of this user on the machine.
  setsid "$VENV_BIN/ray" start --head --block \
    --node-ip-address "$HOST" \
    --port "$RAY_PORT" \
    --dashboard-host "$HOST" \
    --dashboard-port "$DASH_PORT" \
    --num-cpus "$RAY_CPUS" \
    --num-gpus 0 \
    --object-store-memory "$((OBJ_MB * 1024 * 1024))" \
    --temp-dir "$RAY_TMP" \
    --disable-usage-stats \
    >"$RUN/ray.log" 2>&1 </dev/null &
  echo $! >"$RUN/ray.pid"
  wait_for "$DASH_URL/api/version" 120 "$RUN/ray.pid" "ray start" "$RUN/ray.log"
  echo "Ray head started: GCS $HOST:$RAY_PORT, dashboard $DASH_URL (pid $(cat "$RUN/ray.pid"))"
fi

# ---- env.sh -------------------------------------------------------------------------------
cat >"$HERE/env.sh.tmp" <<EOF
# Generated by infra/local/up.sh; source it: . infra/local/env.sh
export AWS_ENDPOINT_URL=$S3_URL
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
# Job API for \`ray job ...\` / JobSubmissionClient. ray.init() refuses an http:// RAY_ADDRESS:
# for a driver started from this shell use RAY_ADDRESS=$HOST:$RAY_PORT (the GCS) instead.
export RAY_ADDRESS=$DASH_URL
export RAY_API_SERVER_ADDRESS=$DASH_URL
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
export NO_PROXY="127.0.0.1,localhost\${NO_PROXY:+,\$NO_PROXY}"
export no_proxy="\$NO_PROXY"
EOF
mv "$HERE/env.sh.tmp" "$HERE/env.sh"

# ---- buckets ------------------------------------------------------------------------------
"$VENV_BIN/python" - ${BUCKETS//,/ } <<'PY'
import sys

import boto3

s3 = boto3.client("s3")
for name in sys.argv[1:]:
    try:
        s3.head_bucket(Bucket=name)
        print(f"bucket s3://{name} exists")
    except s3.exceptions.ClientError:
        s3.create_bucket(Bucket=name)
        print(f"bucket s3://{name} created")
PY

echo "Ready. Run: . infra/local/env.sh"
