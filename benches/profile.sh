#!/usr/bin/env bash
# Instruction profile of `till serve` under a bounded load, with valgrind's callgrind
# (for machines where `perf stat -e instructions` is not supported, e.g. most VMs).
# Upstream: nginx static 200 (benches/nginx.conf); load: wrk, one hot key, -c8, for
# PROFILE_SECS (default 20 s; callgrind slows Till ~50x, so this is a few thousand
# requests). Prints the top functions by inclusive cost for the ledger writer thread and
# for the whole process.
#
# Usage: benches/profile.sh /path/to/till [OUT_DIR]
set -euo pipefail
TILL=${1:?usage: benches/profile.sh /path/to/till [OUT_DIR]}
OUT=${2:-$(mktemp -d /tmp/till-profile.XXXXXX)}
PROFILE_SECS=${PROFILE_SECS:-20}
UPSTREAM_PORT=${UPSTREAM_PORT:-18091}
PROXY_PORT=${PROXY_PORT:-18092}
TILL_PORT=${TILL_PORT:-18093}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/till-prof-work.XXXXXX)
PID=""
cleanup() {
    if [[ -n "$PID" ]]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    if [[ -f "$WORK/nginx.pid" ]]; then kill -QUIT "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
command -v valgrind >/dev/null || { timeout 300 apt-get install -y -qq valgrind >/dev/null; }
mkdir -p "$OUT" "$WORK"/{body,proxy,fastcgi,uwsgi,scgi}
sed -e "s#@PREFIX@#$WORK#g" -e "s#@UPSTREAM_PORT@#$UPSTREAM_PORT#g" -e "s#@PROXY_PORT@#$PROXY_PORT#g" \
    "$ROOT/benches/nginx.conf" >"$WORK/nginx.conf"
nginx -p "$WORK" -c "$WORK/nginx.conf"
cat >"$WORK/till.toml" <<TOML
proxy_id = "profile"
[upstreams.bench]
base_url = "http://127.0.0.1:$UPSTREAM_PORT"
credential_env = "BENCH_UPSTREAM_SECRET"
auth = { header = "authorization", scheme = "Bearer" }
TOML
timeout 30 "$TILL" --dir "$WORK/data" keygen >/dev/null
HOT=$(timeout 30 "$TILL" --dir "$WORK/data" mint --upstream bench --cap 1000000000000)
BENCH_UPSTREAM_SECRET=sk-bench TILL_LOG=warn timeout 600 valgrind --tool=callgrind \
    --separate-threads=yes --callgrind-out-file="$OUT/callgrind.out.%p" \
    "$TILL" --dir "$WORK/data" serve --config "$WORK/till.toml" --listen "127.0.0.1:$TILL_PORT" \
    --admin-listen none >"$WORK/till.out" 2>"$WORK/till.err" &
PID=$!
for _ in $(seq 1 600); do grep -q "listening on" "$WORK/till.out" 2>/dev/null && break; sleep 0.1; done
grep -q "listening on" "$WORK/till.out" || { cat "$WORK/till.err" >&2; exit 1; }
timeout 120 wrk -t1 -c8 -d"${PROFILE_SECS}s" -H "Authorization: Bearer $HOT" \
    "http://127.0.0.1:$TILL_PORT/bench/v1/x" | grep -E 'requests in|Requests/sec'
kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; PID=""
echo "callgrind files in $OUT"
for f in "$OUT"/callgrind.out.*; do
    total=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "== $(basename "$f"): ${total:-0} instructions"
done
