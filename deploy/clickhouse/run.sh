#!/usr/bin/env bash
# Start, stop or query a private ClickHouse server for the zt stack.
#
#   deploy/clickhouse/run.sh start|stop|status <data_dir> [http_port] [tcp_port]
#
# `start` renders config.xml.in and users.xml.in into <data_dir>, starts
# clickhouse-server in the background (pid file <data_dir>/clickhouse.pid) and
# waits until http://127.0.0.1:<http_port>/ping answers (at most 30 s).
# Idempotent: `start` on a running server only says so; `stop` on a stopped one
# too. Defaults: HTTP 8123, native TCP 9000.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf '[clickhouse] %s\n' "$*"; }
die() { printf '[clickhouse] error: %s\n' "$*" >&2; exit 1; }

usage() { die "usage: $0 start|stop|status <data_dir> [http_port] [tcp_port]"; }

[ $# -ge 2 ] || usage
cmd="$1"
mkdir -p "$2"
data_dir="$(cd "$2" && pwd)"
http_port="${3:-8123}"
tcp_port="${4:-9000}"
pid_file="$data_dir/clickhouse.pid"
err_log="$data_dir/log/clickhouse-server.err.log"
start_timeout=30

running_pid() {
  # Prints the server's pid if the pid file names a live clickhouse-server.
  [ -f "$pid_file" ] || return 1
  local pid
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  [ -n "$pid" ] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  grep -q clickhouse "/proc/$pid/cmdline" 2>/dev/null || return 1
  printf '%s\n' "$pid"
}

ping_ok() {
  curl -fsS --max-time 2 "http://127.0.0.1:$http_port/ping" >/dev/null 2>&1
}

render() {
  local src="$1" dst="$2"
  sed -e "s|@DATA_DIR@|$data_dir|g" \
      -e "s|@HTTP_PORT@|$http_port|g" \
      -e "s|@TCP_PORT@|$tcp_port|g" "$src" >"$dst.tmp"
  mv "$dst.tmp" "$dst"
}

start() {
  local server
  server="$(command -v clickhouse-server || true)"
  [ -n "$server" ] || die "clickhouse-server not found; run deploy/setup.sh"
  command -v curl >/dev/null || die "curl not found; run deploy/setup.sh"

  if pid="$(running_pid)"; then
    log "already running (pid $pid, http://127.0.0.1:$http_port)"
    return 0
  fi
  if ping_ok; then
    die "port $http_port already answers /ping but not from the server in $data_dir; stop it or choose another port"
  fi

  mkdir -p "$data_dir"/{data,tmp,user_files,format_schemas,log}
  render "$here/config.xml.in" "$data_dir/config.xml"
  render "$here/users.xml.in" "$data_dir/users.xml"

  log "starting clickhouse-server (data $data_dir, http $http_port, tcp $tcp_port)"
  (
    cd "$data_dir"
    setsid nohup "$server" --config-file="$data_dir/config.xml" \
      >>"$data_dir/log/stdout.log" 2>&1 </dev/null &
    echo $! >"$pid_file"
  )

  local deadline=$((SECONDS + start_timeout))
  local reason="not ready on http://127.0.0.1:$http_port/ping within ${start_timeout}s"
  while [ "$SECONDS" -lt "$deadline" ]; do
    if ping_ok; then
      log "ready: http://127.0.0.1:$http_port (pid $(cat "$pid_file"))"
      return 0
    fi
    if ! running_pid >/dev/null; then
      reason="clickhouse-server exited during start-up"
      break
    fi
    sleep 0.2
  done

  printf '[clickhouse] error: %s\n' "$reason" >&2
  for f in "$err_log" "$data_dir/log/stdout.log"; do
    if [ -s "$f" ]; then
      printf '[clickhouse] --- tail of %s ---\n' "$f" >&2
      tail -n 30 "$f" >&2
    fi
  done
  stop >/dev/null 2>&1 || true
  exit 1
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$pid_file"
    log "not running"
    return 0
  fi
  log "stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 150); do   # up to 15 s, then SIGKILL
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "still running after 15 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$pid_file"
  log "stopped"
}

status() {
  local pid
  if pid="$(running_pid)"; then
    if ping_ok; then
      log "running (pid $pid, http://127.0.0.1:$http_port)"
    else
      log "process running (pid $pid) but http://127.0.0.1:$http_port/ping does not answer"
      return 1
    fi
  else
    log "not running"
    return 3
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
