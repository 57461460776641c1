#!/usr/bin/env bash
# Soak: one hot key at a fixed rate (oha -q RATE) for SOAK_SECS against `till serve`
# (embedded ledger), sampling the server's RSS and the ledger file's size every 10 s.
# Prints the samples, bytes written to the ledger per claim (file growth / claims, over
# the second half of the run, after redb's initial allocation) and the RSS drift.
#
# Usage: benches/soak.sh /path/to/till     (SOAK_SECS=120 RATE=300)
set -euo pipefail
TILL=${1:?usage: benches/soak.sh /path/to/till}
SOAK_SECS=${SOAK_SECS:-120}
RATE=${RATE:-300}
UPSTREAM_PORT=${UPSTREAM_PORT:-18281}
PROXY_PORT=${PROXY_PORT:-18282}
TILL_PORT=${TILL_PORT:-18283}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
[[ -x "$OHA" ]] || timeout 1800 cargo install oha --locked -q
WORK=$(mktemp -d /tmp/till-soak.XXXXXX)
PID=""; LOAD=""
cleanup() {
    [[ -z "$LOAD" ]] || kill "$LOAD" 2>/dev/null || true
    if [[ -n "$PID" ]]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    if [[ -f "$WORK/nginx.pid" ]]; then kill -QUIT "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK"/{body,proxy,fastcgi,uwsgi,scgi}
sed -e "s#@PREFIX@#$WORK#g" -e "s#@UPSTREAM_PORT@#$UPSTREAM_PORT#g" -e "s#@PROXY_PORT@#$PROXY_PORT#g" \
    "$ROOT/benches/nginx.conf" >"$WORK/nginx.conf"
nginx -p "$WORK" -c "$WORK/nginx.conf"
printf 'proxy_id = "soak"\n[upstreams.bench]\nbase_url = "http://127.0.0.1:%s"\ncredential_env = "B"\nauth = { header = "authorization", scheme = "Bearer" }\n' \
    "$UPSTREAM_PORT" >"$WORK/till.toml"
timeout 30 "$TILL" --dir "$WORK/data" keygen >/dev/null
HOT=$(timeout 30 "$TILL" --dir "$WORK/data" mint --upstream bench --cap 1000000000000)
B=sk TILL_LOG=warn timeout $((SOAK_SECS + 120)) "$TILL" --dir "$WORK/data" serve --config "$WORK/till.toml" \
    --listen "127.0.0.1:$TILL_PORT" --admin-listen none >"$WORK/out" 2>"$WORK/err" &
PID=$!
for _ in $(seq 1 100); do grep -q "listening on" "$WORK/out" 2>/dev/null && break; sleep 0.1; done
SERVER=$(pgrep -P "$PID" | head -1) # the till process under `timeout`
timeout $((SOAK_SECS + 60)) "$OHA" -z "${SOAK_SECS}s" -q "$RATE" -c 16 --latency-correction --no-tui \
    --output-format json -H "Authorization: Bearer $HOT" "http://127.0.0.1:$TILL_PORT/bench/v1/x" >"$WORK/oha.json" &
LOAD=$!
echo "t_s rss_kib ledger_bytes"
: >"$WORK/samples"
for t in $(seq 0 10 "$SOAK_SECS"); do
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$SERVER/status")
    size=$(stat -c %s "$WORK/data/ledger.redb")
    echo "$t $rss $size" | tee -a "$WORK/samples"
    [[ $t -lt $SOAK_SECS ]] && sleep 10
done
wait "$LOAD" || true; LOAD=""
python3 - "$WORK/oha.json" "$WORK/samples" "$RATE" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); rows = [list(map(int, l.split())) for l in open(sys.argv[2])]
n = sum(v for k, v in d.get("statusCodeDistribution", {}).items() if k == "200")
rate = float(sys.argv[3]); half = rows[len(rows) // 2]; last = rows[-1]
grown = last[2] - half[2]; claims = rate * (last[0] - half[0])
print(f"claims: {n} (200s); p50 {d['latencyPercentiles']['p50']*1e3:.3f} ms, p99 {d['latencyPercentiles']['p99']*1e3:.3f} ms")
print(f"ledger: {last[2]/max(n,1):.0f} bytes/claim overall; {grown/max(claims,1):.0f} bytes/claim over the second half")
print(f"RSS: {rows[0][1]} KiB at start, {half[1]} KiB at half time, {last[1]} KiB at the end")
PY
