#!/usr/bin/env bash
# Load harness: the same tiny upstream measured (a) directly, (b) through nginx
# proxy_pass, (c) through Till with the embedded ledger — one hot key with a huge cap,
# and (d) 1000 keys round-robin. One bounded wrk run each (default 10 s, 32 connections,
# 2 threads), all on loopback. Prints throughput, p50/p99 and ratios to the direct run.
#
# Usage: benches/load.sh            (DURATION=10s CONNECTIONS=32 THREADS=2 KEYS=1000)
# Needs root for apt-get (nginx, wrk) when they are missing.
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
KEYS=${KEYS:-1000}
UPSTREAM_PORT=${UPSTREAM_PORT:-18081}
PROXY_PORT=${PROXY_PORT:-18082}
TILL_PORT=${TILL_PORT:-18083}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/till-load.XXXXXX)
TILL_PID=""

cleanup() {
    if [[ -n "$TILL_PID" ]]; then kill -TERM "$TILL_PID" 2>/dev/null || true; wait "$TILL_PID" 2>/dev/null || true; fi
    if [[ -f "$WORK/nginx.pid" ]]; then kill -QUIT "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

need=()
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
if ((${#need[@]})); then
    echo "installing ${need[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "building till (release)..." >&2
(cd "$ROOT" && cargo build --release -p till-cli --bin till -q)
TILL="$ROOT/target/release/till"

mkdir -p "$WORK"/{body,proxy,fastcgi,uwsgi,scgi}
sed -e "s#@PREFIX@#$WORK#g" -e "s#@UPSTREAM_PORT@#$UPSTREAM_PORT#g" -e "s#@PROXY_PORT@#$PROXY_PORT#g" \
    "$ROOT/benches/nginx.conf" >"$WORK/nginx.conf"
"$NGINX" -p "$WORK" -c "$WORK/nginx.conf"

cat >"$WORK/till.toml" <<TOML
proxy_id = "load"
[upstreams.bench]
base_url = "http://127.0.0.1:$UPSTREAM_PORT"
credential_env = "BENCH_UPSTREAM_SECRET"
auth = { header = "authorization", scheme = "Bearer" }
TOML
# Per-request info logs are not what is measured: TILL_LOG=warn.
BENCH_UPSTREAM_SECRET=sk-bench TILL_LOG=warn "$TILL" --dir "$WORK/data" serve \
    --config "$WORK/till.toml" --listen "127.0.0.1:$TILL_PORT" >"$WORK/till.out" 2>"$WORK/till.err" &
TILL_PID=$!
for _ in $(seq 1 100); do
    grep -q "listening on" "$WORK/till.out" 2>/dev/null && break
    sleep 0.1
done
grep -q "listening on" "$WORK/till.out" || { cat "$WORK/till.err" >&2; exit 1; }

HOT=$("$TILL" --dir "$WORK/data" mint --upstream bench --cap 1000000000000)
echo "minting $KEYS keys..." >&2
: >"$WORK/keys.txt"
for _ in $(seq 1 "$KEYS"); do
    "$TILL" --dir "$WORK/data" mint --upstream bench --cap 1000000000 >>"$WORK/keys.txt"
done
cat >"$WORK/many.lua" <<'LUA'
local keys = {}
for line in io.lines(os.getenv("TILL_KEYS_FILE")) do keys[#keys + 1] = line end
local i = math.random(#keys)
request = function()
  i = i % #keys + 1
  return wrk.format("GET", "/bench/v1/x", { ["Authorization"] = "Bearer " .. keys[i] })
end
LUA

# Sanity: every path answers 200 before measuring.
for url in "http://127.0.0.1:$UPSTREAM_PORT/v1/x" "http://127.0.0.1:$PROXY_PORT/bench/v1/x"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$url" 2>/dev/null || echo skip)
    [[ "$code" == 200 || "$code" == skip ]] || { echo "$url answered $code" >&2; exit 1; }
done

run() { # name, wrk args...
    local name=$1; shift
    local out
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@")
    local rps p50 p99 non2xx
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $5}' <<<"$out")
    printf '%-28s %12s req/s   p50 %9s   p99 %9s   non-2xx %s\n' "$name" "$rps" "$p50" "$p99" "${non2xx:-0}"
    echo "$name $rps" >>"$WORK/rps.txt"
}

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency; $(nproc) CPUs; loopback"
run "direct upstream" "http://127.0.0.1:$UPSTREAM_PORT/v1/x"
run "nginx proxy_pass" "http://127.0.0.1:$PROXY_PORT/bench/v1/x"
run "till, 1 hot key" -H "Authorization: Bearer $HOT" "http://127.0.0.1:$TILL_PORT/bench/v1/x"
TILL_KEYS_FILE="$WORK/keys.txt" run "till, $KEYS keys round-robin" -s "$WORK/many.lua" "http://127.0.0.1:$TILL_PORT/bench/v1/x"

awk 'NR == 1 {base = $NF} {name = $0; sub(/ [^ ]+$/, "", name); printf "  %-28s %6.1f%% of direct\n", name, 100 * $NF / base}' "$WORK/rps.txt"
