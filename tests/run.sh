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

say "receipt test vectors verified by a stock JOSE library (Python)"
"$VENV/bin/python" spec/interop/verify_receipt.py spec/vectors/receipts.json

if [ -n "${TILL_FDB_CLUSTER_FILE:-}" ]; then
  say "FoundationDB conformance + fleet tests against $TILL_FDB_CLUSTER_FILE"
  cargo test --locked -p till-ledger-fdb
  cargo test --locked -p till-cli --features fdb --test fleet
else
  echo
  echo "SKIPPED: FoundationDB cluster tests (set TILL_FDB_CLUSTER_FILE; see fdb/README.md)"
fi
