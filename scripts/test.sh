#!/usr/bin/env bash
# Install everything and run every test: unit, model-based, race (failpoints),
# power-loss and fault-injection harnesses, integration tests that drive the real
# binary with real NBD/FUSE peers, and the fuzz targets.  Prints each stage's time.
set -euo pipefail
cd "$(dirname "$0")/.."
stage() {
  local name=$1; shift
  local t0=$SECONDS
  echo "== stage: $name" >&2
  "$@"
  echo "== stage: $name took $((SECONDS - t0)) s" >&2
}
stage setup bash scripts/setup.sh
source scripts/env.sh
# One feature set for everything CI builds: `failpoints` compiles the failpoints
# the race and fault tests drive (they are inert unless a test configures them).
stage build cargo build --release --locked --all-targets --features failpoints
stage fuzz bash scripts/fuzz.sh
# The tests last, so their summary closes the output.
stage test cargo test --release --locked --features failpoints --lib --bins --tests
