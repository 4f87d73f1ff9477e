#!/usr/bin/env bash
# Install everything, build, and run drclone's main job on an embedded default:
# a store, a protected application with two disks (an ext4 file system and a
# database-like disk), an import, a recovery point, more replication, a clone of
# the point, and checks that the clone holds the point's data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
# The same build as scripts/test.sh (same flags, same features), so running one
# after the other shares one build instead of rebuilding and replacing the binary.
cargo build --release --locked --all-targets --features failpoints
# On PATH for the rest of the demo and afterwards.
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO install -m 0755 "$CARGO_TARGET_DIR/release/drclone" /usr/local/bin/drclone
DRCLONE=/usr/local/bin/drclone
echo "installed drclone as /usr/local/bin/drclone (on PATH: $(command -v drclone || echo "no, add /usr/local/bin to PATH"))"
WORK="${DRCLONE_DEMO_DIR:-$(mktemp -d /tmp/drclone-demo.XXXXXX)}"
export DRCLONE_STORE="$WORK/store"
say() { printf '\n== %s\n' "$*"; }

say "building the default disk images in $WORK"
truncate -s 256M "$WORK/os.img"
mkfs.ext4 -q -F -d /usr/share/doc "$WORK/os.img"
truncate -s 64M "$WORK/data.img"
head -c 16M /dev/urandom > "$WORK/rand.bin"
dd if="$WORK/rand.bin" of="$WORK/data.img" conv=notrunc status=none
dd if="$WORK/rand.bin" of="$WORK/data.img" bs=1M seek=32 conv=notrunc status=none

say "drclone init + group + volumes"
"$DRCLONE" init
"$DRCLONE" group create app1
"$DRCLONE" volume create app1/os --size 256M
"$DRCLONE" volume create app1/data --size 64M

say "replicate (import) both disks, then take a crash-consistent point of the group"
"$DRCLONE" import app1/os "$WORK/os.img"
"$DRCLONE" import app1/data "$WORK/data.img"
"$DRCLONE" point create app1 --label seed

say "replication goes on: the head changes after the point"
head -c 8M /dev/urandom > "$WORK/newer.bin"
dd if="$WORK/newer.bin" of="$WORK/data2.img" bs=1M status=none
truncate -s 64M "$WORK/data2.img"
"$DRCLONE" import app1/data "$WORK/data2.img"
"$DRCLONE" point list app1

say "clone the point (O(1)) and check the clone holds the point's data"
"$DRCLONE" group create drill
"$DRCLONE" clone app1/os@latest drill/os
"$DRCLONE" clone app1/data@1 drill/data
"$DRCLONE" export drill/os "$WORK/os.out"
"$DRCLONE" export drill/data "$WORK/data.out"
cmp "$WORK/os.img" "$WORK/os.out"
cmp "$WORK/data.img" "$WORK/data.out"
e2fsck -fn "$WORK/os.out" >/dev/null && echo "e2fsck: the clone's ext4 file system is clean"

say "serve the store over NBD and check the clone with real NBD clients"
SOCK="$WORK/nbd.sock"
"$DRCLONE" serve --no-tcp --socket "$SOCK" >/dev/null &
SERVE=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
nbdinfo --list "nbd+unix:///?socket=$SOCK" | grep -E "export=|export-size" | head -8
qemu-img compare -f raw -F raw "nbd+unix:///drill/os?socket=$SOCK" "$WORK/os.img"
"$DRCLONE" point list app1          # goes through the daemon's control socket
kill -TERM "$SERVE"; wait "$SERVE"

say "space and integrity"
"$DRCLONE" df
"$DRCLONE" verify
echo
echo "demo OK; store at $DRCLONE_STORE"

say "the DR story on a real VM (scripts/demo-dr.sh)"
DRCLONE="$DRCLONE" DRCLONE_DEMO_DIR="$WORK" bash scripts/demo-dr.sh
echo
echo "drclone is installed as /usr/local/bin/drclone; try: DRCLONE_STORE=$DRCLONE_STORE drclone point list app1"
echo "the demo's files are in $WORK (remove it when done)"
