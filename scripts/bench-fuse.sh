#!/usr/bin/env bash
# FUSE throughput: drclone's own mount vs nbdfuse over drclone's NBD export of the
# same volume, in one run.  Sequential write/read (dd, 1 MiB blocks, O_DIRECT) and
# 4k random read/write (fio, psync engine, iodepth 1, 4 jobs) on the volume file.
# Prints MB/s and IOPS and the ratios mount/nbdfuse.
# Env: SIZE_MIB (default 512), RUNTIME (fio seconds, default 15), BENCH_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --bin drclone
SIZE_MIB="${SIZE_MIB:-512}"
RUNTIME="${RUNTIME:-15}"
B="${BENCH_DIR:-/var/tmp/drclone-bench-fuse}"
for m in "$B/mnt" "$B/nbdfuse"; do fusermount3 -uz "$m" 2>/dev/null || true; done
rm -rf "$B"; mkdir -p "$B/mnt" "$B/nbdfuse"
pids=()
cleanup() {
  fusermount3 -u "$B/nbdfuse" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
export DRCLONE_STORE="$B/store"
"$DRCLONE" init >/dev/null
"$DRCLONE" group create bench >/dev/null
"$DRCLONE" volume create bench/a --size "${SIZE_MIB}M" >/dev/null
"$DRCLONE" volume create bench/b --size "${SIZE_MIB}M" >/dev/null
"$DRCLONE" serve --no-tcp --socket "$B/nbd.sock" >/dev/null & pids+=($!)
for _ in $(seq 100); do [ -S "$B/nbd.sock" ] && break; sleep 0.1; done
"$DRCLONE" mount "$B/mnt" >/dev/null & pids+=($!)
nbdfuse "$B/nbdfuse/b" "nbd+unix:///bench/b?socket=$B/nbd.sock" & pids+=($!)
for _ in $(seq 100); do [ -f "$B/mnt/bench/a" ] && [ -e "$B/nbdfuse/b" ] && break; sleep 0.1; done
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$B/src.img"
mbs() { echo "scale=0; $SIZE_MIB * 1048576 / $1 / 1000000" | bc -l; }
secs() { local t0 t1; t0=$(date +%s.%N); "$@" 2>/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
iops() {
  fio --name=b --filename="$1" --ioengine=psync --direct=1 --rw="$2" --bs=4k --numjobs=4 --group_reporting \
      --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --output-format=json 2>/dev/null |
    /usr/bin/python3 -c "import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs'][0]; print(int(j['read']['iops']+j['write']['iops']))"
}
declare -A R
for kind in mount nbdfuse; do
  f="$B/mnt/bench/a"; [ $kind = nbdfuse ] && f="$B/nbdfuse/b"
  R[$kind,seqw]=$(mbs "$(secs dd if="$B/src.img" of="$f" bs=1M oflag=direct conv=notrunc,fsync)")
  R[$kind,seqr]=$(mbs "$(secs dd if="$f" of=/dev/null bs=1M iflag=direct)")
  R[$kind,randr]=$(iops "$f" randread)
  R[$kind,randw]=$(iops "$f" randwrite)
  echo "$kind done" >&2
done
ratio() { echo "scale=2; ${R[mount,$1]} / ${R[nbdfuse,$1]}" | bc -l; }
printf '\n%-22s %12s %12s %14s\n' test "drclone mount" nbdfuse "mount/nbdfuse"
for t in seqw:"seq write MB/s" seqr:"seq read MB/s" randr:"4k randread IOPS" randw:"4k randwrite IOPS"; do
  k=${t%%:*}; n=${t#*:}
  printf '%-22s %12s %12s %13sx\n' "$n" "${R[mount,$k]}" "${R[nbdfuse,$k]}" "$(ratio $k)"
done
