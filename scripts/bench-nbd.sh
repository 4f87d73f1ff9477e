#!/usr/bin/env bash
# NBD throughput: drclone vs qemu-nbd (raw file) vs nbdkit (file plugin), one run,
# same data, unix sockets for all three.
#   sequential write of unique random data and sequential read: nbdcopy
#   4k random read and write at iodepth 16: fio --ioengine=nbd, and 4k random write
#   with a FLUSH after every 16 writes (a VM whose file system commits often)
# Prints MB/s or IOPS per server and the ratios drclone/qemu-nbd and drclone/nbdkit.
# Sequential runs are repeated RUNS times and the median is shown: single runs on
# this shared machine vary by 2x for every server.  Every write run is a fresh
# disk for every server: it copies a different random file (so drclone cannot
# deduplicate against an earlier run), and the raw files behind qemu-nbd and nbdkit
# are truncated to nothing and back first (so they cannot overwrite pages already
# in the page cache, which drclone, appending to packs, never can either).  The
# page cache is dropped before the run when permitted.
# Env: SIZE_MIB (default 1024), RUNTIME (fio seconds, default 20), RUNS (default 3),
#      BENCH_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --bin drclone
SIZE_MIB="${SIZE_MIB:-1024}"
RUNTIME="${RUNTIME:-20}"
RUNS="${RUNS:-3}"
B="${BENCH_DIR:-/var/tmp/drclone-bench-nbd}"
rm -rf "$B"; mkdir -p "$B"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "preparing $RUNS x ${SIZE_MIB} MiB of random data"
for i in $(seq "$RUNS"); do head -c "$((SIZE_MIB << 20))" /dev/urandom > "$B/src$i.img"; done
sync
echo 3 2>/dev/null > /proc/sys/vm/drop_caches || echo "(page cache not dropped: not permitted)"
# Read the sources once so every server copies from the page cache.
cat "$B"/src*.img > /dev/null

# --- servers
truncate -s "${SIZE_MIB}M" "$B/qemu.img"
qemu-nbd -f raw -x disk -t -k "$B/qemu.sock" --shared=16 --discard=unmap "$B/qemu.img" & pids+=($!)
truncate -s "${SIZE_MIB}M" "$B/nbdkit.img"
nbdkit -f -U "$B/nbdkit.sock" -e disk file "$B/nbdkit.img" & pids+=($!)
export DRCLONE_STORE="$B/store"
"$DRCLONE" init >/dev/null
"$DRCLONE" group create bench >/dev/null
"$DRCLONE" volume create bench/disk --size "${SIZE_MIB}M" >/dev/null
"$DRCLONE" serve --no-tcp --socket "$B/drclone.sock" >/dev/null & pids+=($!)
for s in qemu nbdkit drclone; do
  for _ in $(seq 100); do [ -S "$B/$s.sock" ] && break; sleep 0.1; done
done
uri() {
  case $1 in
    qemu) echo "nbd+unix:///disk?socket=$B/qemu.sock" ;;
    nbdkit) echo "nbd+unix:///disk?socket=$B/nbdkit.sock" ;;
    drclone) echo "nbd+unix:///bench/disk?socket=$B/drclone.sock" ;;
  esac
}
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
mbs() { echo "scale=0; $SIZE_MIB * 1048576 / $1 / 1000000" | bc -l; }
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
iops() {
  fio --name=b --ioengine=nbd --uri="$(uri "$1")" --rw="$2" ${3:+--fsync=$3} --bs=4k --iodepth=16 --numjobs=1 \
      --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --output-format=json 2>/dev/null |
    /usr/bin/python3 -c "import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs'][0]; print(int(j['read']['iops']+j['write']['iops']))"
}
declare -A R
for s in qemu nbdkit drclone; do
  w=(); r=()
  for i in $(seq "$RUNS"); do
    if [ "$s" != drclone ]; then truncate -s 0 "$B/$s.img"; truncate -s "${SIZE_MIB}M" "$B/$s.img"; fi
    w+=("$(mbs "$(secs nbdcopy "$B/src$i.img" "$(uri $s)")")")
    sync
  done
  for i in $(seq "$RUNS"); do r+=("$(mbs "$(secs nbdcopy "$(uri $s)" null:)")"); done
  echo "$s: seq write MB/s ${w[*]}; seq read MB/s ${r[*]}" >&2
  R[$s,seqw]=$(median "${w[@]}")
  R[$s,seqr]=$(median "${r[@]}")
  R[$s,randr]=$(iops $s randread)
  R[$s,randw]=$(iops $s randwrite)
  R[$s,randwf]=$(iops $s randwrite 16)
  echo "$s done" >&2
done
ratio() { echo "scale=2; ${R[drclone,$1]} / ${R[$2,$1]}" | bc -l; }
printf '\n%-22s %10s %10s %10s %12s %12s\n' test qemu-nbd nbdkit drclone "vs qemu-nbd" "vs nbdkit"
for t in seqw:"seq write MB/s" seqr:"seq read MB/s" randr:"4k randread IOPS" randw:"4k randwrite IOPS" randwf:"4k rw+flush/16 IOPS"; do
  k=${t%%:*}; n=${t#*:}
  printf '%-22s %10s %10s %10s %11sx %11sx\n' "$n" "${R[qemu,$k]}" "${R[nbdkit,$k]}" "${R[drclone,$k]}" "$(ratio $k qemu)" "$(ratio $k nbdkit)"
done
