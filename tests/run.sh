#!/usr/bin/env bash
# The README's test command: sets up what the tests need, then runs every test.
# Safe to run on a fresh Debian 12 machine with only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

# Python JOSE library for the receipt interoperability check (a stock implementation in
# another language must verify our receipts). Installed into a private venv.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  say "installing python3-venv (Debian)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
fi
VENV="${TILL_TEST_VENV:-target/test-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  say "setting up $VENV (receipt interop check)"
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r spec/interop/requirements.txt

say "cargo test (every crate, unit + integration + end-to-end)"
cargo test --locked

say "FoundationDB backend: retry and idempotency logic against the in-memory transaction model"
cargo test --locked -p till-ledger-fdb --no-default-features

say "fuzz targets over their committed corpus (stable toolchain; cargo fuzz for the real thing)"
CARGO_TARGET_DIR="$PWD/target" cargo test --locked --manifest-path fuzz/Cargo.toml
CARGO_TARGET_DIR="$PWD/target" cargo check --locked --manifest-path fuzz/Cargo.toml --features libfuzzer --bins

say "admin API against its OpenAPI description (schemathesis driving a live till serve)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r spec/interop/requirements-admin.txt
cargo build --locked -p till-cli
ST_TMP="$(mktemp -d)"
printf '[upstreams.openai]\nbase_url = "http://127.0.0.1:9"\ncredential_env = "TILL_ST_SECRET"\n' > "$ST_TMP/till.toml"
TILL_ST_SECRET=sk-schemathesis "${CARGO_TARGET_DIR:-target}/debug/till" --dir "$ST_TMP/data" serve --config "$ST_TMP/till.toml" \
  --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 > "$ST_TMP/serve.log" 2>&1 &
ST_PID=$!
trap 'kill "$ST_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 150); do [ -f "$ST_TMP/data/admin.json" ] && break; sleep 0.2; done
ADMIN_URL="$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$ST_TMP/data/admin.json")"
"$VENV/bin/schemathesis" run spec/admin-openapi.yaml --url "$ADMIN_URL" \
  -H "Authorization: Bearer $(cat "$ST_TMP/data/admin.key")" \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance \
  --max-examples 30 --exclude-path /admin/v1/events --seed 1
kill "$ST_PID" 2>/dev/null || true
trap - EXIT

say "dashboard in a real browser (headless chromium over WebDriver; screenshots in target/ui-screenshots/)"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  say "installing chromium chromium-driver (Debian)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/ui/requirements.txt
TILL_BIN="${CARGO_TARGET_DIR:-target}/debug/till" "$VENV/bin/python" -m pytest tests/ui -q -p no:cacheprovider

say "receipt test vectors verified by a stock JOSE library (Python)"
"$VENV/bin/python" spec/interop/verify_receipt.py spec/vectors/receipts.json

say "attenuating Till keys from other languages against a live till serve (biscuit-python; biscuit-wasm from Node)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r spec/interop/requirements-token.txt
cargo build --locked -p till-cli
if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
  (cd tests/interop && npm ci --silent --no-audit --no-fund)
  export TILL_INTEROP_REQUIRE_NODE=1
else
  echo
  echo "SKIPPED: @biscuit-auth/biscuit-wasm interop (needs node and npm)"
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/interop
unset TILL_INTEROP_REQUIRE_NODE

say "official OpenAI and Anthropic Python SDKs against a live till serve (per-call ceilings, windowed caps)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/sdk

if [ -n "${TILL_FDB_CLUSTER_FILE:-}" ]; then
  say "FoundationDB conformance + fleet tests against $TILL_FDB_CLUSTER_FILE"
  cargo test --locked -p till-ledger-fdb
  cargo test --locked -p till-cli --features fdb --test fleet
else
  echo
  echo "SKIPPED: FoundationDB cluster tests (set TILL_FDB_CLUSTER_FILE; see fdb/README.md)"
fi
