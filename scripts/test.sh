#!/usr/bin/env bash
# Install everything and run every test: unit, model-based, and integration tests
# that drive the real binary (and, where a test needs them, real NBD/FUSE peers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --all-targets
cargo test --release --locked --lib --bins --tests
