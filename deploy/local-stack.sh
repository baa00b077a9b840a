#!/usr/bin/env bash
# The whole stack on this machine, for `make up` / `make down`:
# ClickHouse (own data directory), zt-collector, and zt-agent on this host
# (attached to the machine itself, as on a staff PC; it only observes).
#
#   deploy/local-stack.sh up|down|status
#
# State, logs and pid files live in .zt/ of the checkout. Idempotent: `up`
# starts whichever part is not running.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/.zt"
bin="${ZT_BIN_DIR:-$root/target/release}"
log() { printf '[stack] %s\n' "$*"; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

ztctl_config="${ZTCTL_CONFIG:-$HOME/.config/zt/ztctl.toml}"
collector_addr="127.0.0.1:50051"

pid_alive() { # name
  local f="$state/$1.pid"
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

wait_for_log() { # name needle seconds
  local name=$1 needle=$2 limit=$3 deadline=$((SECONDS + $3))
  while [ "$SECONDS" -lt "$deadline" ]; do
    grep -q "$needle" "$state/logs/$name.log" 2>/dev/null && return 0
    pid_alive "$name" || { tail -n 30 "$state/logs/$name.log" >&2; die "$name exited during start-up (log: $state/logs/$name.log)"; }
    sleep 0.2
  done
  tail -n 30 "$state/logs/$name.log" >&2
  die "$name not ready within ${limit}s (log: $state/logs/$name.log)"
}

start_daemon() { # name needle command...
  local name=$1 needle=$2
  shift 2
  if pid_alive "$name"; then
    log "$name already running (pid $(cat "$state/$name.pid"))"
    return 0
  fi
  log "starting $name"
  # A fresh log per start, so readiness is judged on this run's output.
  : >"$state/logs/$name.log"
  setsid nohup "$@" >>"$state/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$state/$name.pid"
  wait_for_log "$name" "$needle" 60
  log "$name running (pid $(cat "$state/$name.pid"), log $state/logs/$name.log)"
}

stop_daemon() { # name
  local name=$1 f="$state/$1.pid"
  if ! pid_alive "$name"; then
    rm -f "$f"
    return 0
  fi
  local pid
  pid=$(cat "$f")
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$f"
}

up() {
  for b in zt-collector zt-agent ztctl; do
    [ -x "$bin/$b" ] || die "$bin/$b missing: build with 'cargo build --release --bins' (make up does)"
  done
  mkdir -p "$state/logs" "$state/agent" "$state/collector"
  "$root/deploy/clickhouse/run.sh" start "$state/clickhouse"
  local collector=("$bin/zt-collector" --config "$root/deploy/local/collector.toml" --state-dir "$state/collector")
  start_daemon collector "collector listening" "${collector[@]}" --listen "$collector_addr"

  # Enroll this host once, as an installer would: a one-time token from
  # the collector's CA, then `zt-agent enroll` (the key stays in .zt/agent).
  if [ ! -f "$state/agent/identity/device.pem" ]; then
    log "enrolling this host into organisation 'local'"
    local token
    token=$("${collector[@]}" token create --org local --device "$(hostname -s | tr 'A-Z' 'a-z' | tr -c 'a-z0-9._\n-' '-')" --ttl 10m)
    "$bin/zt-agent" --config "$root/deploy/local/agent.toml" --state-dir "$state/agent" \
      enroll --collector "https://$collector_addr" --token "$token"
  fi
  start_daemon agent "telemetry stream open" \
    env ZT_AGENT_GUARD__POLICY_FILE="$root/deploy/local/guard.toml" \
    ZT_AGENT_TUNNEL__GATEWAY_LISTEN=127.0.0.1:15443 \
    "$bin/zt-agent" --config "$root/deploy/local/agent.toml" --state-dir "$state/agent"

  # ztctl's credential: an admin of 'local', reissued on every `up` so it
  # always matches this stack's CA.
  local ztctl_dir
  ztctl_dir=$(dirname "$ztctl_config")
  mkdir -p "$ztctl_dir"
  "${collector[@]}" credential create --org local --user admin --out "$ztctl_dir" >/dev/null
  cat >"$ztctl_config" <<TOML
# written by make up
collector_url = "https://$collector_addr"
credential = "$ztctl_dir/credential.pem"
ca_bundle = "$ztctl_dir/ca.pem"
TOML

  # The web console's account: 'soc' (the prefecture-wide role), with a
  # password made on the first `up` and kept in the state directory.
  local console_password="$state/console-password"
  if [ ! -s "$console_password" ]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$console_password")
  fi
  "${collector[@]}" account create --org local --user soc --role soc <"$console_password" 2>/dev/null

  cat <<MSG

The stack is up.
  collector (gRPC)   https://$collector_addr (mutual TLS; CA in $state/collector/ca)
  ClickHouse (HTTP)  http://127.0.0.1:8123, database zt
  logs               $state/logs/
  SOC console        https://$collector_addr/console/  user soc, password in $state/console-password
                     (the certificate is the collector's own CA: $ztctl_dir/ca.pem)

Try:
  $bin/ztctl status
  $bin/ztctl incidents list
  curl http://127.0.0.68:8080/     # "Ok." from ClickHouse, through the zero-trust tunnel
  clickhouse-client --query "SELECT time, exe, action, verdict, rule_id, enforcement_point, reason FROM zt.decisions ORDER BY time DESC LIMIT 10"
  clickhouse-client --query "SELECT time, hostname, pid, ppid, uid, filename, argv FROM zt.process_events ORDER BY time DESC LIMIT 10"

Stop everything with: make down
MSG
}

down() {
  stop_daemon agent
  stop_daemon collector
  "$root/deploy/clickhouse/run.sh" stop "$state/clickhouse"
  log "stack stopped"
}

status() {
  for name in collector agent; do
    if pid_alive "$name"; then log "$name running (pid $(cat "$state/$name.pid"))"; else log "$name not running"; fi
  done
  "$root/deploy/clickhouse/run.sh" status "$state/clickhouse" || true
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) die "usage: $0 up|down|status" ;;
esac
