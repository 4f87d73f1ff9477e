#!/usr/bin/env bash
# Replication benchmark, on loopback, side by side in one run (issue 10):
#   1. seed throughput: `drclone replicate` of a random file into `drclone serve`,
#      against `nbdcopy` of the same file into `qemu-nbd` (raw file);
#   2. an incremental cycle with 1% of the source changed (1 MiB regions): time and
#      bytes against `rsync --inplace --no-whole-file` of the same change;
#   3. the same incremental cycle from a qcow2 source served by `qemu-nbd -B` with a
#      dirty bitmap (`--dirty-bitmap`): only the dirty blocks are read.
# Targets: seed >= 0.8x nbdcopy; incremental bytes <= 0.5x rsync's; incremental time
# with a dirty bitmap <= 0.1x rsync's.  Prints ratios; asserts nothing.
# Env: SIZE_MIB (default 1024; the issue's case is 4096).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --all-targets --features failpoints >/dev/null 2>&1 ||
  cargo build --release --locked --all-targets --features failpoints
SIZE_MIB="${SIZE_MIB:-1024}"
B=$(mktemp -d /tmp/drclone-bench-repl.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$B"; }
trap cleanup EXIT
now() { date +%s.%N; }
el() { echo "$2 - $1" | bc -l; }
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "preparing ${SIZE_MIB} MiB of random data in $B"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$B/src.img"
CHANGED=$((SIZE_MIB / 100)); [ "$CHANGED" -ge 1 ] || CHANGED=1
# 1% of the regions, 1 MiB each, spread over the file (same offsets for every tool).
OFFS=$(/usr/bin/python3 -c "import random; random.seed(7); print(' '.join(str(x) for x in sorted(random.sample(range($SIZE_MIB), $CHANGED))))")
change() { # FILE: overwrite the chosen 1 MiB regions with fresh random data
  for o in $OFFS; do head -c 1M /dev/urandom | dd of="$1" bs=1M seek="$o" conv=notrunc status=none; done
}

# --- drclone target ---
export DRCLONE_STORE="$B/store"
"$DRCLONE" init >/dev/null
RP=$(free_port)
"$DRCLONE" serve --no-tcp --socket "$B/nbd.sock" --replication-listen "127.0.0.1:$RP" >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 200); do [ -S "$DRCLONE_STORE/control.sock" ] && break; sleep 0.05; done
rep() { "$DRCLONE" --json replicate --target "127.0.0.1:$RP" --state-dir "$B/agent" "$@"; }

t0=$(now); rep --volume b/d="$B/src.img" > "$B/seed.json"; t1=$(now)
SEED_DR=$(el "$t0" "$t1")

# --- qemu-nbd + nbdcopy seed ---
truncate -s "${SIZE_MIB}M" "$B/qemu.raw"
qemu-nbd -f raw -x disk -t --socket "$B/qemu.sock" "$B/qemu.raw" & PIDS+=($!)
for _ in $(seq 200); do [ -S "$B/qemu.sock" ] && break; sleep 0.05; done
t0=$(now); nbdcopy "$B/src.img" "nbd+unix:///disk?socket=$B/qemu.sock"; t1=$(now)
SEED_NBDCOPY=$(el "$t0" "$t1")

# --- incremental: drclone vs rsync ---
cp --reflink=auto "$B/src.img" "$B/rsync-dst.img"
change "$B/src.img"
t0=$(now); rep --volume b/d="$B/src.img" > "$B/inc.json"; t1=$(now)
INC_DR=$(el "$t0" "$t1")
INC_DR_BYTES=$(/usr/bin/python3 -c "import json; print(json.load(open('$B/inc.json'))['bytes_sent'])")
t0=$(now)
RS=$(rsync --inplace --no-whole-file --ignore-times --stats "$B/src.img" "$B/rsync-dst.img")
t1=$(now)
INC_RSYNC=$(el "$t0" "$t1")
INC_RSYNC_BYTES=$(echo "$RS" | awk -F': ' '/Total bytes sent/ {gsub(/,/, "", $2); print $2+0}')

# --- incremental with a dirty bitmap ---
qemu-img create -q -f qcow2 "$B/vm.qcow2" "${SIZE_MIB}M"
qemu-img convert -n -f raw -O qcow2 "$B/src.img" "$B/vm.qcow2"
qemu-img bitmap --add "$B/vm.qcow2" b0
qemu-nbd -r -t -B b0 -x disk -f qcow2 --socket "$B/vm.sock" "$B/vm.qcow2" & QB=$!
for _ in $(seq 200); do [ -S "$B/vm.sock" ] && break; sleep 0.05; done
rep --volume v/d="nbd+unix:///disk?socket=$B/vm.sock" --dirty-bitmap b0 > /dev/null
kill -TERM "$QB"; wait "$QB" 2>/dev/null || true
ARGS=(); for o in $OFFS; do ARGS+=(-c "write -P 0x5a ${o}M 1M"); done
qemu-io -f qcow2 "${ARGS[@]}" "$B/vm.qcow2" >/dev/null
rm -f "$B/vm.sock"
qemu-nbd -r -t -B b0 -x disk -f qcow2 --socket "$B/vm.sock" "$B/vm.qcow2" & PIDS+=($!)
for _ in $(seq 200); do [ -S "$B/vm.sock" ] && break; sleep 0.05; done
t0=$(now); rep --volume v/d="nbd+unix:///disk?socket=$B/vm.sock" --dirty-bitmap b0 > "$B/bm.json"; t1=$(now)
INC_BM=$(el "$t0" "$t1")
INC_BM_BYTES=$(/usr/bin/python3 -c "import json; print(json.load(open('$B/bm.json'))['bytes_sent'])")

r() { echo "scale=3; $1 / $2" | bc -l; }
MB=$((SIZE_MIB << 20))
printf '\n%s MiB source, %s MiB changed (1%%)\n' "$SIZE_MIB" "$CHANGED"
printf '%-44s %12s %12s %10s\n' case drclone peer ratio
printf '%-44s %10.0f MB/s %7.0f MB/s %9.2fx   (target >= 0.8x)\n' "seed vs nbdcopy into qemu-nbd" \
  "$(echo "$MB / $SEED_DR / 1000000" | bc -l)" "$(echo "$MB / $SEED_NBDCOPY / 1000000" | bc -l)" "$(r "$SEED_NBDCOPY" "$SEED_DR")"
printf '%-44s %12s %12s %9.3fx   (target <= 0.5x)\n' "incremental bytes vs rsync" "$INC_DR_BYTES" "$INC_RSYNC_BYTES" "$(r "$INC_DR_BYTES" "$INC_RSYNC_BYTES")"
printf '%-44s %11.2fs %11.2fs %9.3fx\n' "incremental time vs rsync (file source)" "$INC_DR" "$INC_RSYNC" "$(r "$INC_DR" "$INC_RSYNC")"
printf '%-44s %11.2fs %11.2fs %9.3fx   (target <= 0.1x)\n' "incremental time, dirty bitmap, vs rsync" "$INC_BM" "$INC_RSYNC" "$(r "$INC_BM" "$INC_RSYNC")"
printf '%-44s %12s\n' "dirty-bitmap cycle bytes on the wire" "$INC_BM_BYTES"
