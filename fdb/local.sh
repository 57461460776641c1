#!/usr/bin/env bash
# A single-process FoundationDB cluster on 127.0.0.1 for Till's tests and benchmarks.
#
#   fdb/local.sh start          start fdbserver, `configure new single <engine>`, print the cluster file
#   fdb/local.sh stop           stop it and delete its data
#   fdb/local.sh status         `fdbcli status` (exit 1 when not running)
#   fdb/local.sh cluster-file   print the cluster file path
#
# Needs fdbserver and fdbcli (FoundationDB 7.3) on PATH. Environment:
#   TILL_FDB_DIR     state dir (default: ${TMPDIR:-/tmp}/till-fdb-$USER)
#   TILL_FDB_PORT    port (default 4689, so it never collides with a system fdbserver on 4500)
#   TILL_FDB_ENGINE  memory (default) or ssd
#
# Then: TILL_FDB_CLUSTER_FILE=$(fdb/local.sh cluster-file) cargo test -p till-ledger-fdb --test fdb_cluster
set -euo pipefail

DIR="${TILL_FDB_DIR:-${TMPDIR:-/tmp}/till-fdb-${USER:-$(id -un)}}"
PORT="${TILL_FDB_PORT:-4689}"
ENGINE="${TILL_FDB_ENGINE:-memory}"
CLUSTER="$DIR/fdb.cluster"
PIDFILE="$DIR/fdbserver.pid"

die() { echo "fdb/local.sh: $*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH (install FoundationDB 7.3 client and server packages)"
}

running() {
  [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

cli() {
  fdbcli -C "$CLUSTER" --timeout 10 --exec "$1"
}

start() {
  need fdbserver
  need fdbcli
  case "$ENGINE" in memory|ssd) ;; *) die "TILL_FDB_ENGINE must be memory or ssd, not $ENGINE" ;; esac
  if running; then
    echo "$CLUSTER"
    return 0
  fi
  mkdir -p "$DIR/data" "$DIR/logs"
  local fresh=0
  if [[ ! -f "$CLUSTER" ]]; then
    # description:id; the id only needs to be unique per cluster.
    echo "till_local:$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')@127.0.0.1:$PORT" > "$CLUSTER"
    fresh=1
  fi
  fdbserver --cluster-file "$CLUSTER" --public-address "127.0.0.1:$PORT" \
    --listen-address "127.0.0.1:$PORT" --datadir "$DIR/data" --logdir "$DIR/logs" \
    >"$DIR/fdbserver.out" 2>&1 &
  echo $! > "$PIDFILE"
  if [[ $fresh -eq 1 ]]; then
    # Bounded wait for the server to take the coordinator role, then create the database.
    local ok=0
    for _ in $(seq 1 30); do
      if cli "configure new single $ENGINE" >/dev/null 2>&1; then ok=1; break; fi
      running || die "fdbserver exited; see $DIR/fdbserver.out"
      sleep 1
    done
    [[ $ok -eq 1 ]] || die "could not configure the database; see $DIR/logs"
  fi
  # Bounded wait until the database is available.
  for _ in $(seq 1 30); do
    if cli "status minimal" 2>/dev/null | grep -q "available"; then
      echo "$CLUSTER"
      return 0
    fi
    sleep 1
  done
  die "database not available after 30 s; see $DIR/logs"
}

stop() {
  if running; then
    local pid
    pid="$(cat "$PIDFILE")"
    kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  # Only ever delete our own state dir.
  [[ -f "$CLUSTER" || -f "$PIDFILE" ]] && rm -rf "$DIR"
  echo "stopped"
}

status() {
  running || { echo "not running"; exit 1; }
  cli "status"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  cluster-file) echo "$CLUSTER" ;;
  *) echo "usage: $0 start|stop|status|cluster-file" >&2; exit 2 ;;
esac
