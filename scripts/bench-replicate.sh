#!/usr/bin/env bash
# Replication benchmark, on loopback, side by side in one run (issue 10):
#   1. seed throughput: `drclone replicate` of a random file into `drclone serve`,
#      against `nbdcopy` of the same file into `qemu-nbd` (raw file), without and
#      with --flush (drclone's seed ends durable: its point commits synced);
#   2. an incremental cycle with 1% of the source changed (1 MiB regions), in two
#      flavours: random data (incompressible: no tool can send much less than the
#      changed bytes, so bytes can at best tie rsync) and realistic compressible
#      data (a round-robin mix of /usr/bin, /usr/lib/python3.x and /usr/share/doc,
#      like a VM's files).  Each against `rsync --inplace --no-whole-file` of the
#      same change (no -z, as the issue says): time and bytes;
#   3. the same two changes written through qemu-io into a qcow2 of the disk,
#      served by `qemu-nbd -B` with a dirty bitmap (`--dirty-bitmap`), into a
#      fresh store (so nothing dedups against the file-source cycles): only the
#      dirty blocks are read.
# Targets: seed >= 0.8x nbdcopy; incremental bytes <= 0.5x rsync's; incremental
# time with a dirty bitmap <= 0.1x rsync's.  Prints ratios; asserts nothing.
# Env: SIZE (default 1G; the issue's case is SIZE=4G; K/M/G suffixes, whole MiB);
# RUNS (seed rounds, default 3; medians reported).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
build() { flock /tmp/drclone-cargo.lock cargo build --release --locked --all-targets --features failpoints "$@"; }
build >/dev/null 2>&1 || build
SIZE="${SIZE:-1G}"
SIZE_MIB="${SIZE_MIB:-$(($(numfmt --from=iec "$SIZE") >> 20))}"
[ "$SIZE_MIB" -ge 1 ] || { echo "SIZE must be at least 1M" >&2; exit 2; }
B=$(mktemp -d /tmp/drclone-bench-repl.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$B"; }
trap cleanup EXIT
now() { date +%s.%N; }
el() { echo "$2 - $1" | bc -l; }
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
field() { /usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

echo "preparing ${SIZE_MIB} MiB of random data in $B"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$B/src.img"
CHANGED=$((SIZE_MIB / 100)); [ "$CHANGED" -ge 1 ] || CHANGED=1
# 1% of the regions, 1 MiB each, spread over the file; each flavour its own offsets.
offsets() { /usr/bin/python3 -c "import random; random.seed($1); print(' '.join(str(x) for x in sorted(random.sample(range($SIZE_MIB), $CHANGED))))"; }
declare -A OFFS=([random]="$(offsets 7)" [text]="$(offsets 8)")
# The data of each changed region (the same for the file, rsync and the qcow2).
mkdir -p "$B/regions/random" "$B/regions/text"
for i in $(seq 0 $((CHANGED - 1))); do head -c 1M /dev/urandom > "$B/regions/random/$i"; done
PY=$(cd /usr/lib && ls -d python3.* | head -1)
SRCS=(usr/bin "usr/lib/$PY" usr/share/doc)
PER=$(((CHANGED + 2) / 3))
for k in 0 1 2; do
  tar -cf - -C / "${SRCS[$k]}" 2>/dev/null | head -c "$((PER << 20))" > "$B/pool$k" || true
done
for i in $(seq 0 $((CHANGED - 1))); do
  dd if="$B/pool$((i % 3))" of="$B/regions/text/$i" bs=1M skip=$((i / 3)) count=1 status=none
done
TEXT_ZSTD=$(cat "$B"/regions/text/* | zstd -1 -c | wc -c)
change() { # FILE FLAVOUR: overwrite the flavour's regions
  local i=0
  for o in ${OFFS[$2]}; do dd if="$B/regions/$2/$i" of="$1" bs=1M seek="$o" conv=notrunc status=none; i=$((i + 1)); done
}
qchange() { # QCOW2 FLAVOUR: the same writes through qemu (they mark the dirty bitmap)
  local i=0 args=()
  for o in ${OFFS[$2]}; do args+=(-c "write -s $B/regions/$2/$i ${o}M 1M"); i=$((i + 1)); done
  qemu-io -f qcow2 "${args[@]}" "$1" >/dev/null
}

# --- drclone targets: one for the file source, then a fresh one for the
# dirty-bitmap volume ---
PORT= SERVE=
serve() { # STORE: init and serve it; its replication port in $PORT, pid in $SERVE
  PORT=$(free_port)
  DRCLONE_STORE="$1" "$DRCLONE" init >/dev/null
  DRCLONE_STORE="$1" "$DRCLONE" serve --no-tcp --socket "$1.nbd.sock" --replication-listen "127.0.0.1:$PORT" >/dev/null 2>&1 &
  SERVE=$!
  PIDS+=("$SERVE")
  wait_sock "$1/control.sock"
}
stop() { kill -TERM "$1"; wait "$1" 2>/dev/null || true; }
rep() { "$DRCLONE" --json replicate --target "127.0.0.1:$1" --state-dir "$B/agent" "${@:2}"; }

# Every phase keeps at most two disk-sized files (the source and one copy):
# at SIZE=4G the peak is about 2x SIZE on disk.  Each flavour's change is
# undone after each phase (newest first: the flavours' regions may overlap).
save() { # FLAVOUR: keep what its regions hold now (to undo the change later)
  local i=0
  mkdir -p "$B/orig/$1"
  for o in ${OFFS[$1]}; do dd if="$B/src.img" of="$B/orig/$1/$i" bs=1M skip="$o" count=1 status=none; i=$((i + 1)); done
}
undo() {
  local f i o
  for f in text random; do
    i=0
    for o in ${OFFS[$f]}; do dd if="$B/orig/$f/$i" of="$B/src.img" bs=1M seek="$o" conv=notrunc status=none; i=$((i + 1)); done
  done
}
declare -A DR DRB RS RSB BM BMB

# --- rsync --inplace --no-whole-file of each change onto a copy of the disk ---
cp --reflink=auto "$B/src.img" "$B/rsync-dst.img"
for f in random text; do
  save "$f"
  change "$B/src.img" "$f"
  t0=$(now)
  out=$(rsync --inplace --no-whole-file --ignore-times --stats "$B/src.img" "$B/rsync-dst.img")
  t1=$(now)
  RS[$f]=$(el "$t0" "$t1")
  RSB[$f]=$(echo "$out" | awk -F': ' '/Total bytes sent/ {gsub(/,/, "", $2); print $2+0}')
  cmp "$B/src.img" "$B/rsync-dst.img"
done
rm -f "$B/rsync-dst.img"
undo

# --- seed: drclone into a fresh store, nbdcopy into a fresh raw file behind
# qemu-nbd, with and without --flush (drclone's seed ends durable: its point
# commits synced).  RUNS rounds, the order rotated each round, medians
# reported.  This VM returns freed memory to its host (free page reporting),
# so a tool that fills the page cache with pages the host took back pays a
# host fault per page, and single runs swung by 2x with the order: each timed
# seed starts right after the same warm-up (SIZE bytes of memory touched and
# freed).
SECS= STORE_PID=
warm() { /usr/bin/python3 -c "import sys; b = bytearray(b'w') * int(sys.argv[1])" "$((SIZE_MIB << 20))"; }
drop_store() { if [ -n "$STORE_PID" ]; then stop "$STORE_PID"; STORE_PID=; rm -rf "$B/store" "$B/store.nbd.sock" "$B/agent"; fi; }
dr_seed() { # seed the source into a fresh store (left served: $RP, $STORE_PID); seconds in $SECS
  drop_store
  serve "$B/store"; RP=$PORT; STORE_PID=$SERVE
  sync
  warm
  local t0 t1
  t0=$(now); rep "$RP" --volume b/d="$B/src.img" > "$B/seed.json"; t1=$(now)
  SECS=$(el "$t0" "$t1")
}
nbdcopy_seed() { # [--flush]: nbdcopy the source into a fresh raw file behind qemu-nbd; seconds in $SECS
  local t0 t1 qn
  drop_store
  truncate -s "${SIZE_MIB}M" "$B/qemu.raw"
  rm -f "$B/qemu.sock"
  qemu-nbd -f raw -x disk -t --socket "$B/qemu.sock" "$B/qemu.raw" & qn=$!; PIDS+=("$qn")
  wait_sock "$B/qemu.sock"
  sync
  warm
  t0=$(now); nbdcopy "$@" "$B/src.img" "nbd+unix:///disk?socket=$B/qemu.sock"; t1=$(now)
  stop "$qn"; rm -f "$B/qemu.raw"
  SECS=$(el "$t0" "$t1")
}
median() { /usr/bin/python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
RUNS="${RUNS:-3}"
SD=() SN=() SF=()
for run in $(seq "$RUNS"); do
  for k in 0 1 2; do
    case $(((k + run) % 3)) in
      0) dr_seed; SD+=("$SECS");;
      1) nbdcopy_seed; SN+=("$SECS");;
      2) nbdcopy_seed --flush; SF+=("$SECS");;
    esac
  done
done
# The incremental cycles need a seeded store (untimed if the last round
# did not end with one).
[ -n "$STORE_PID" ] || dr_seed
SEED_DR=$(median "${SD[@]}"); SEED_NBDCOPY=$(median "${SN[@]}"); SEED_NBDCOPY_FLUSH=$(median "${SF[@]}")
mbs_list() { local o=() x; for x in "$@"; do o+=("$(printf '%.0f' "$(echo "($SIZE_MIB * 1048576) / $x / 1000000" | bc -l)")"); done; echo "${o[*]}"; }
echo "seed MB/s per run: drclone $(mbs_list "${SD[@]}"); nbdcopy $(mbs_list "${SN[@]}"); nbdcopy --flush $(mbs_list "${SF[@]}")"

# --- drclone cycles of the same changes from the file ---
for f in random text; do
  change "$B/src.img" "$f"
  t0=$(now); rep "$RP" --volume b/d="$B/src.img" > "$B/inc-$f.json"; t1=$(now)
  DR[$f]=$(el "$t0" "$t1"); DRB[$f]=$(field "$B/inc-$f.json" bytes_sent)
done
drop_store
undo

# --- the same changes written through qemu into a qcow2 of the disk, served
# by qemu-nbd with a dirty bitmap, into a fresh store (so nothing dedups
# against the cycles above) ---
qemu-img create -q -f qcow2 "$B/vm.qcow2" "${SIZE_MIB}M"
qemu-img convert -n -f raw -O qcow2 "$B/src.img" "$B/vm.qcow2"
rm -f "$B/src.img"
qemu-img bitmap --add "$B/vm.qcow2" b0
serve "$B/store-bm"; RPB=$PORT
QB=
qemu_bm() { rm -f "$B/vm.sock"; qemu-nbd -r -t -B b0 -x disk -f qcow2 --socket "$B/vm.sock" "$B/vm.qcow2" & QB=$!; PIDS+=("$QB"); wait_sock "$B/vm.sock"; }
qemu_bm
rep "$RPB" --volume v/d="nbd+unix:///disk?socket=$B/vm.sock" --dirty-bitmap b0 > /dev/null
stop "$QB"
for f in random text; do
  # The bitmap then holds only this flavour's writes.
  qemu-img bitmap --clear "$B/vm.qcow2" b0
  qchange "$B/vm.qcow2" "$f"
  qemu_bm
  t0=$(now); rep "$RPB" --volume v/d="nbd+unix:///disk?socket=$B/vm.sock" --dirty-bitmap b0 > "$B/bm-$f.json"; t1=$(now)
  stop "$QB"
  BM[$f]=$(el "$t0" "$t1"); BMB[$f]=$(field "$B/bm-$f.json" bytes_sent)
done

r() { echo "scale=3; $1 / $2" | bc -l; }
MB=$((SIZE_MIB << 20))
CB=$((CHANGED << 20))
printf '\n%s MiB source, %s MiB changed (1%%, 1 MiB regions); %s cores, load %s\n' "$SIZE_MIB" "$CHANGED" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'compressible changes: zstd -1 makes their %s bytes %s (%.2fx)\n' "$CB" "$TEXT_ZSTD" "$(r "$TEXT_ZSTD" "$CB")"
printf '%-52s %12s %12s %9s\n' case drclone peer ratio
mbs() { echo "$MB / $1 / 1000000" | bc -l; }
printf '%-52s %7.0f MB/s %7.0f MB/s %8.2fx   (target >= 0.8x)\n' "seed vs nbdcopy into qemu-nbd" \
  "$(mbs "$SEED_DR")" "$(mbs "$SEED_NBDCOPY")" "$(r "$SEED_NBDCOPY" "$SEED_DR")"
printf '%-52s %7.0f MB/s %7.0f MB/s %8.2fx   (both durable at the end)\n' "seed vs nbdcopy --flush" \
  "$(mbs "$SEED_DR")" "$(mbs "$SEED_NBDCOPY_FLUSH")" "$(r "$SEED_NBDCOPY_FLUSH" "$SEED_DR")"
for f in random text; do
  case $f in
    random) note="random: at best a tie";;
    text) note="target <= 0.5x";;
  esac
  printf '%-52s %12s %12s %8.3fx   (%s)\n' "1% $f, bytes vs rsync (file source)" "${DRB[$f]}" "${RSB[$f]}" "$(r "${DRB[$f]}" "${RSB[$f]}")" "$note"
  printf '%-52s %12s %12s %8.3fx\n' "1% $f, bytes vs rsync (dirty bitmap)" "${BMB[$f]}" "${RSB[$f]}" "$(r "${BMB[$f]}" "${RSB[$f]}")"
  printf '%-52s %11.2fs %11.2fs %8.3fx\n' "1% $f, time vs rsync (file source, all hashed)" "${DR[$f]}" "${RS[$f]}" "$(r "${DR[$f]}" "${RS[$f]}")"
  printf '%-52s %11.2fs %11.2fs %8.3fx   (target <= 0.1x)\n' "1% $f, time vs rsync (dirty bitmap)" "${BM[$f]}" "${RS[$f]}" "$(r "${BM[$f]}" "${RS[$f]}")"
done

# 4. Failback of 1% changed (issue 12), against rsync of the same files.
# This bench's processes and files go first: at SIZE=4G both do not fit on
# the disk at once.
cleanup; PIDS=(); trap - EXIT
if [ "${BENCH_FAILBACK:-1}" != 0 ]; then
  SIZE="$SIZE" bash scripts/bench-failback.sh
fi
