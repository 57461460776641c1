#!/usr/bin/env bash
# Load harness: the same tiny upstream (nginx answering a static OpenAI-shaped chat
# completion) measured (a) directly, (b) through nginx proxy_pass, (c) through Till with
# the embedded ledger — one hot key with a huge cap, and (d) 1000 keys round-robin —
# and (f) through the LiteLLM proxy (2 workers, master key only, no database). One
# bounded wrk run each (default 10 s, 32 connections, 2 threads), then latency at a fixed
# rate with oha (default 1000 req/s, latency-corrected) for nginx proxy_pass and Till.
# All on loopback. Prints throughput, p50/p99 and the ratios to nginx proxy_pass.
#
# TILL_BIN=/path/to/till measures that binary instead of building one.
# TILL_BEFORE=/path/to/older/till runs the Till cases for that binary too, in the same
# run, against the same upstream and with the same keys (before/after comparisons).
#
# Usage: benches/load.sh   (DURATION=10s CONNECTIONS=64 THREADS=2 KEYS=1000 RATE=1000
#                           RATE_CONNECTIONS=32 RATE_DURATION=10s LITELLM=1; LITELLM=0
#                           skips LiteLLM, RATE=0 the fixed-rate runs)
# The defaults are issue 11's harness: `wrk -t2 -c64 -d10s` for throughput, `oha -q 1000
# -c 32 --latency-correction` for latency at a fixed rate. (Results before issue 11's
# second round were measured with CONNECTIONS=32; benches/RESULTS.md names each run's.)
# Needs root for apt-get (nginx, wrk) when they are missing; installs oha with
# `cargo install --locked` and LiteLLM with pip into target/bench-venv when missing.
# Every step is bounded in time; the whole run takes about 3-4 minutes once installed.
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
RATE_CONNECTIONS=${RATE_CONNECTIONS:-32}
THREADS=${THREADS:-2}
KEYS=${KEYS:-1000}
RATE=${RATE:-1000}
RATE_DURATION=${RATE_DURATION:-10s}
LITELLM=${LITELLM:-1}
UPSTREAM_PORT=${UPSTREAM_PORT:-18081}
PROXY_PORT=${PROXY_PORT:-18082}
TILL_PORT=${TILL_PORT:-18083}
LITELLM_PORT=${LITELLM_PORT:-18084}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/till-load.XXXXXX)
TILL_PID=""
LITELLM_PID=""

stop_till() {
    if [[ -n "$TILL_PID" ]]; then kill -TERM "$TILL_PID" 2>/dev/null || true; wait "$TILL_PID" 2>/dev/null || true; fi
    TILL_PID=""
}
cleanup() {
    stop_till
    if [[ -n "$LITELLM_PID" ]]; then kill -TERM -- "-$LITELLM_PID" 2>/dev/null || kill -TERM "$LITELLM_PID" 2>/dev/null || true; fi
    if [[ -f "$WORK/nginx.pid" ]]; then kill -QUIT "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

need=()
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
if ((${#need[@]})); then
    echo "installing ${need[*]}" >&2
    timeout 300 apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
if [[ "$RATE" != 0 && ! -x "$OHA" ]]; then
    echo "installing oha (cargo install --locked; a few minutes, once)..." >&2
    timeout 1200 cargo install oha --locked -q >&2
fi
if [[ "$LITELLM" == 1 ]]; then
    VENV="$ROOT/target/bench-venv"
    if [[ ! -x "$VENV/bin/litellm" ]]; then
        echo "installing LiteLLM into $VENV (pip, once)..." >&2
        timeout 120 python3 -m venv "$VENV"
        timeout 900 "$VENV/bin/pip" install -q 'litellm[proxy]' >&2
    fi
fi

if [[ -n "${TILL_BIN:-}" ]]; then
    TILL=$TILL_BIN # a prebuilt binary (e.g. a copy, while the target dir is being rebuilt)
else
    echo "building till (release)..." >&2
    (cd "$ROOT" && timeout 1800 cargo build --release -p till-cli --bin till -q)
    TILL="$ROOT/target/release/till"
fi

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

if [[ "$LITELLM" == 1 ]]; then
    cat >"$WORK/litellm.yaml" <<YAML
model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: http://127.0.0.1:$UPSTREAM_PORT/v1
      api_key: sk-bench
general_settings:
  master_key: sk-bench-master
litellm_settings:
  telemetry: false
YAML
    # Own process group (setsid), so cleanup ends its workers too.
    LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR setsid timeout 600 "$VENV/bin/litellm" \
        --config "$WORK/litellm.yaml" --host 127.0.0.1 --port "$LITELLM_PORT" --num_workers 2 \
        >"$WORK/litellm.out" 2>&1 &
    LITELLM_PID=$!
fi

# One root key for every Till binary measured: the keys minted once work for all.
timeout 30 "$TILL" --dir "$WORK/keys" keygen >/dev/null
HOT=$(timeout 30 "$TILL" --dir "$WORK/keys" mint --upstream bench --cap 1000000000000)
echo "minting $KEYS keys..." >&2
: >"$WORK/keys.txt"
for _ in $(seq 1 "$KEYS"); do
    timeout 30 "$TILL" --dir "$WORK/keys" mint --upstream bench --cap 1000000000 >>"$WORK/keys.txt"
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
cat >"$WORK/chat.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-master"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
LUA

start_till() { # binary, data dir
    local bin=$1 dir=$2
    mkdir -p "$dir" && cp "$WORK/keys"/*.jwk "$dir"/ && chmod 600 "$dir"/*.jwk
    # Per-request info logs are not what is measured: TILL_LOG=warn.
    BENCH_UPSTREAM_SECRET=sk-bench TILL_LOG=warn timeout 900 "$bin" --dir "$dir" serve \
        --config "$WORK/till.toml" --listen "127.0.0.1:$TILL_PORT" --admin-listen none \
        >"$dir.out" 2>"$dir.err" &
    TILL_PID=$!
    for _ in $(seq 1 100); do
        grep -q "listening on" "$dir.out" 2>/dev/null && break
        sleep 0.1
    done
    grep -q "listening on" "$dir.out" || { cat "$dir.err" >&2; exit 1; }
    local code
    code=$(curl -s -m 10 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $HOT" \
        "http://127.0.0.1:$TILL_PORT/bench/v1/x" || echo none)
    [[ "$code" == 200 ]] || { echo "till ($bin) answered $code" >&2; cat "$dir.err" >&2; exit 1; }
}

# Sanity: every path answers 200 before measuring.
for url in "http://127.0.0.1:$UPSTREAM_PORT/v1/x" "http://127.0.0.1:$PROXY_PORT/bench/v1/x"; do
    code=$(curl -s -m 10 -o /dev/null -w '%{http_code}' "$url" 2>/dev/null || echo none)
    [[ "$code" == 200 ]] || { echo "$url answered $code" >&2; exit 1; }
done

: >"$WORK/rps.txt"
run() { # name, wrk args...
    local name=$1; shift
    local out
    out=$(timeout 120 wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@")
    local rps p50 p99 non2xx
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $5}' <<<"$out")
    printf '%-34s %12s req/s   p50 %9s   p99 %9s   non-2xx %s\n' "$name" "$rps" "$p50" "$p99" "${non2xx:-0}"
    echo "$name|$rps" >>"$WORK/rps.txt"
}
: >"$WORK/lat.txt"
fixed_rate() { # name, oha args... : latency at a fixed rate, corrected for coordinated omission
    local name=$1; shift
    [[ "$RATE" != 0 ]] || return 0
    timeout 120 "$OHA" -z "$RATE_DURATION" -q "$RATE" -c "$RATE_CONNECTIONS" --latency-correction \
        --no-tui --output-format json "$@" >"$WORK/oha.json" 2>"$WORK/oha.err" || {
        echo "oha failed for $name:" >&2; cat "$WORK/oha.err" >&2; return 0; }
    python3 - "$name" "$WORK/oha.json" "$WORK/lat.txt" <<'PY'
import json, sys
name, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
d = json.load(open(path))
p = d["latencyPercentiles"]
ok = d["summary"]["successRate"]
codes = d.get("statusCodeDistribution", {})
p50, p99 = p["p50"] * 1000, p["p99"] * 1000
print(f"{name:<34} {d['summary']['requestsPerSec']:9.0f} req/s   p50 {p50:7.3f}ms   p99 {p99:7.3f}ms   success {ok:.3f} {codes}")
open(out, "a").write(f"{name}|{p50}|{p99}\n")
PY
}

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency; $(nproc) CPUs; loopback; load average $(cut -d' ' -f1-3 /proc/loadavg)"
run "direct upstream" "http://127.0.0.1:$UPSTREAM_PORT/v1/x"
run "nginx proxy_pass" "http://127.0.0.1:$PROXY_PORT/bench/v1/x"

if [[ "$LITELLM" == 1 ]]; then
    # Started before minting (it takes tens of seconds to come up); idle until measured.
    code=none
    for _ in $(seq 1 150); do
        code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
            -H 'Authorization: Bearer sk-bench-master' \
            -d '{"model":"bench","messages":[{"role":"user","content":"hi"}]}' \
            "http://127.0.0.1:$LITELLM_PORT/v1/chat/completions" 2>/dev/null) || code=none
        [[ "$code" == 200 ]] && break
        sleep 1
    done
    if [[ "$code" == 200 ]]; then
        run "litellm (2 workers, POST chat)" -s "$WORK/chat.lua" "http://127.0.0.1:$LITELLM_PORT/v1/chat/completions"
    else
        echo "SKIPPED: litellm did not answer 200 (got $code):" >&2; tail -20 "$WORK/litellm.out" >&2
    fi
    kill -TERM -- "-$LITELLM_PID" 2>/dev/null || kill -TERM "$LITELLM_PID" 2>/dev/null || true
    wait "$LITELLM_PID" 2>/dev/null || true
    LITELLM_PID=""
fi

till_cases() { # label, binary
    local label=$1 bin=$2
    start_till "$bin" "$WORK/data-$label"
    run "till$label, 1 hot key" -H "Authorization: Bearer $HOT" "http://127.0.0.1:$TILL_PORT/bench/v1/x"
    TILL_KEYS_FILE="$WORK/keys.txt" run "till$label, $KEYS keys round-robin" -s "$WORK/many.lua" "http://127.0.0.1:$TILL_PORT/bench/v1/x"
    fixed_rate "till$label, hot key @${RATE}/s" -H "Authorization: Bearer $HOT" "http://127.0.0.1:$TILL_PORT/bench/v1/x"
    stop_till
}
if [[ -n "${TILL_BEFORE:-}" ]]; then till_cases " (before)" "$TILL_BEFORE"; fi
till_cases "" "$TILL"
fixed_rate "nginx proxy_pass @${RATE}/s" "http://127.0.0.1:$PROXY_PORT/bench/v1/x"

echo "throughput vs nginx proxy_pass:"
awk -F'|' '$1 == "nginx proxy_pass" {base = $2} {name[NR] = $1; rps[NR] = $2}
    END {for (i = 1; i <= NR; i++) printf "  %-34s %6.2fx nginx (%5.1f%% of direct)\n", name[i], rps[i] / base, 100 * rps[i] / rps[1]}' "$WORK/rps.txt"
echo "added latency at ${RATE} req/s (minus nginx proxy_pass, latency-corrected):"
awk -F'|' '$1 ~ /^nginx/ {b50 = $2; b99 = $3} {name[NR] = $1; p50[NR] = $2; p99[NR] = $3}
    END {for (i = 1; i <= NR; i++) if (name[i] !~ /^nginx/) printf "  %-34s p50 %+7.3f ms   p99 %+7.3f ms\n", name[i], p50[i] - b50, p99[i] - b99}' "$WORK/lat.txt"

# ---------------------------------------------------------------------------------------
# (e) Fleet hot key (issue 15): three `till serve --ledger fdb:$TILL_FDB_CLUSTER_FILE`
# proxies sharing one FoundationDB key space (fresh per run) and one set of root/receipt
# keys (copied), one hot key, one wrk per proxy in parallel (-t1 -c$CONNECTIONS each).
# Prints activations/s (receipts in the chain / wall time of the load) and each proxy's
# req/s, then `till audit` of the hot key against the cluster. Needs a build with
# `--features fdb` (libfdb_c 7.3; fdb/README.md). Every step is bounded in time.
FLEET_PORT=${FLEET_PORT:-18090}
FLEET_PIDS=()
fleet_cleanup() {
    local pid
    for pid in "${FLEET_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${FLEET_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    FLEET_PIDS=()
}
fleet_case() {
    local fleet="$WORK/fleet" keyspace="till-load-$$-$(date +%s)" i dir code hot start elapsed out
    local -a wrk_pids=()
    trap 'fleet_cleanup; cleanup' EXIT
    [[ -s "$TILL_FDB_CLUSTER_FILE" ]] || { echo "TILL_FDB_CLUSTER_FILE=$TILL_FDB_CLUSTER_FILE is not a file" >&2; exit 1; }
    echo "building till with --features fdb (release)..." >&2
    (cd "$ROOT" && timeout 1800 cargo build --release -p till-cli --features fdb --bin till -q)

    timeout 30 "$TILL" --dir "$fleet/p1" keygen >/dev/null
    for i in 1 2 3; do
        dir="$fleet/p$i"
        if ((i > 1)); then mkdir -p "$dir" && cp "$fleet/p1"/*.jwk "$dir"/ && chmod 600 "$dir"/*.jwk; fi
        BENCH_UPSTREAM_SECRET=sk-bench TILL_LOG=warn timeout 900 "$TILL" --dir "$dir" serve \
            --config "$WORK/till.toml" --listen "127.0.0.1:$((FLEET_PORT + i))" --proxy-id "fleet-$i" \
            --ledger "fdb:$TILL_FDB_CLUSTER_FILE" --keyspace "$keyspace" \
            --admin-listen 127.0.0.1:0 >"$dir.out" 2>"$dir.err" &
        FLEET_PIDS+=($!)
    done
    for i in 1 2 3; do
        for _ in $(seq 1 150); do
            grep -q "listening on" "$fleet/p$i.out" 2>/dev/null && break
            sleep 0.1
        done
        grep -q "listening on" "$fleet/p$i.out" || { echo "fleet proxy $i did not start:" >&2; cat "$fleet/p$i.err" >&2; exit 1; }
    done

    hot=$(timeout 30 "$TILL" --dir "$fleet/p1" mint --upstream bench --cap 1000000000000)
    for i in 1 2 3; do # every proxy answers the hot key before measuring
        code=$(curl -s -m 10 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $hot" \
            "http://127.0.0.1:$((FLEET_PORT + i))/bench/v1/x" || echo none)
        [[ "$code" == 200 ]] || { echo "fleet proxy $i answered $code" >&2; cat "$fleet/p$i.err" >&2; exit 1; }
    done

    echo "fleet: 3 proxies on $TILL_FDB_CLUSTER_FILE (key space $keyspace), one hot key; wrk -t1 -c$CONNECTIONS -d$DURATION per proxy"
    start=$(date +%s.%N)
    for i in 1 2 3; do
        timeout 600 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: Bearer $hot" \
            "http://127.0.0.1:$((FLEET_PORT + i))/bench/v1/x" >"$fleet/wrk$i.txt" &
        wrk_pids+=($!)
    done
    for i in "${wrk_pids[@]}"; do wait "$i"; done
    elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
    for i in 1 2 3; do
        out=$(cat "$fleet/wrk$i.txt")
        printf '  proxy %d: %12s req/s   p50 %9s   p99 %9s   non-2xx %s\n' "$i" \
            "$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")" "$(awk '$1 == "50%" {print $2}' <<<"$out")" \
            "$(awk '$1 == "99%" {print $2}' <<<"$out")" "$(awk '/Non-2xx or 3xx responses:/ {print $5}' <<<"$out" | grep . || echo 0)"
    done
    fleet_cleanup

    echo "auditing the hot key's chain on the cluster..." >&2
    local audit_start audit_secs clean receipts
    audit_start=$(date +%s.%N)
    timeout 600 "$TILL" --dir "$fleet/p1" audit --json --ledger "fdb:$TILL_FDB_CLUSTER_FILE" \
        --keyspace "$keyspace" "$hot" >"$fleet/audit.json" || {
        echo "till audit FAILED:" >&2; cat "$fleet/audit.json" >&2; exit 1; }
    audit_secs=$(awk -v a="$audit_start" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
    read -r clean receipts < <(python3 -c 'import json, sys; a = json.load(open(sys.argv[1])); print(a["clean"], a["report"]["receipts"])' "$fleet/audit.json")
    awk -v n="$receipts" -v t="$elapsed" 'BEGIN {printf "  fleet, 1 hot key, 3 proxies: %d activations in %.1f s = %.0f activations/s\n", n, t, n / t}'
    printf '  till audit: clean=%s, %d receipts, %.1f s\n' "$clean" "$receipts" "$audit_secs"
    [[ "$clean" == True ]] || { echo "the fleet's audit is NOT clean" >&2; exit 1; }
}
echo
if [[ -z "${TILL_FDB_CLUSTER_FILE:-}" ]]; then
    echo "SKIPPED: fleet hot-key case (set TILL_FDB_CLUSTER_FILE)"
else
    fleet_case
fi
