# Sourced by the scripts: one target directory outside the clone, so fresh clones
# on the same machine reuse the (slow) RocksDB build.  Everything builds in the
# release profile only.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drclone-target}"
DRCLONE="$CARGO_TARGET_DIR/release/drclone"
