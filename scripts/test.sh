#!/usr/bin/env bash
# Install everything and run every test: unit, model-based, and integration tests
# that drive the real binary (and, where a test needs them, real NBD/FUSE peers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
# One feature set for everything CI builds: `failpoints` compiles the failpoints
# the race and fault tests drive (they are inert unless a test configures them).
cargo build --release --locked --all-targets --features failpoints
cargo test --release --locked --features failpoints --lib --bins --tests
bash scripts/fuzz.sh
