#!/usr/bin/env bash
# S3 pack backend benchmark (issue 13), side by side in one run on one throw-away
# single-node Ceph cluster (mon, mgr, one bluestore OSD on a sparse file on tmpfs,
# radosgw; scripts/ceph-test-cluster.sh, stopped by PID at exit):
#   1. drclone with local packs: sequential write of SIZE through its NBD export
#      (unix socket), then sequential read twice (after a restart of `serve`);
#   2. drclone with its packs in a radosgw bucket (`init --backend s3://...`):
#      the same write, timed twice: "acknowledged" (fio done, end_fsync included)
#      and "uploaded" (a recovery point seals the open pack, then `status --json`
#      is polled until the upload backlog is empty: every byte is in RADOS).
#      Then `serve` is restarted (its caches start empty) and the volume is read
#      twice: cold (ranged GETs from radosgw) and warm (from the local read cache,
#      --cache-size 2x SIZE);
#   3. radosgw's own ingest, for scale: the same amount of random data as 64 MiB
#      objects (drclone's pack size) PUT by curl (--aws-sigv4, unsigned payload),
#      one at a time and 4 at a time (drclone's uploader threads);
#   4. Ceph RBD on the same OSD: an image in a fresh pool, the same fio jobs with
#      --ioengine=rbd (librbd; the peer a Ceph user would pick instead).
# Every job is fio, 1 MiB sequential I/O, iodepth 8, fresh incompressible random
# data for every block (--refill_buffers: drclone stores zero blocks as holes and
# dedups repeated chunks, RBD does neither, so random data is the fair case and
# zstd gains nothing on it).  Times are wall time around fio (RBD's include its
# cluster connect, well under a second).  drclone's in-memory chunk cache is
# limited to DRCLONE_CACHE_MIB (default 64) in both drclone runs, so the warm read
# measures the S3 backend's read cache on local disk, not RAM.
# Also reported: the local disk used by the S3-backed store (du of the store
# directory, read cache included) per TB of logical data, after the uploads
# drained and after the warm read filled the cache.
# Targets: S3 warm read >= 0.8x local packs' read; S3 write >= 0.5x RBD's.
# Prints a table and ratios; asserts nothing.
# Env: SIZE (default 1G, whole MiB; the OSD file and everything RBD and radosgw
# write live on tmpfs, i.e. in RAM: about 4.5x SIZE); DRCLONE_CACHE_MIB (64);
# CEPH_TEST_OSD_BYTES (default max(12 GiB, 12x SIZE); sparse: bluestore aborts on
# ENOSPC, and a 4 GiB one did so holding about 2.2 GiB of objects).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
build() { flock /tmp/drclone-cargo.lock cargo build --release --locked --all-targets --features failpoints "$@"; }
build >/dev/null 2>&1 || build
DRCLONE="$CARGO_TARGET_DIR/release/drclone"
SIZE="${SIZE:-1G}"
SIZE_MIB=$(($(numfmt --from=iec "$SIZE") >> 20))
[ "$SIZE_MIB" -ge 64 ] || { echo "SIZE must be at least 64M" >&2; exit 2; }
BYTES=$((SIZE_MIB << 20))
export DRCLONE_CACHE_MIB="${DRCLONE_CACHE_MIB:-64}"
OSD_MIN=$((12 * BYTES)); [ "$OSD_MIN" -ge 12884901888 ] || OSD_MIN=12884901888
export CEPH_TEST_OSD_BYTES="${CEPH_TEST_OSD_BYTES:-$OSD_MIN}"
CLUSTER=scripts/ceph-test-cluster.sh
# The cluster on tmpfs, as tests/s3.rs does: the monitor refuses to start on a
# file system with (about) 0% free ("mon data avail crit"), which a shared disk
# can be, and the sparse OSD file costs only the RAM actually written.
SHM=/dev/shm; [ -d "$SHM" ] || SHM=${TMPDIR:-/tmp}
CD="$SHM/drclone-bench-s3-ceph.$$"
need_kib=$(((BYTES * 9 / 2 + (1 << 30)) >> 10))
avail_kib=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
[ "$avail_kib" -ge "$need_kib" ] || { echo "need about $((need_kib >> 10)) MiB of free RAM for the tmpfs cluster, $((avail_kib >> 10)) MiB available" >&2; exit 2; }
B=$(mktemp -d /tmp/drclone-bench-s3.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$CLUSTER" stop "$CD" || true
  rm -rf "$B"
}
trap cleanup EXIT
now() { date +%s.%N; }
el() { echo "$2 - $1" | bc -l; }
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

# --- the cluster: two consecutive free ports for the monitor (v1, v2), one for radosgw
while :; do
  MONPORT=$(free_port)
  [ "$MONPORT" -lt 65000 ] && /usr/bin/python3 -c "import socket,sys; socket.socket().bind(('127.0.0.1',int(sys.argv[1])))" $((MONPORT + 1)) 2>/dev/null && break
done
RGWPORT=$(free_port)
t0=$(now)
ENDPOINT=$("$CLUSTER" start "$CD" "$MONPORT" "$RGWPORT" | tail -1)
echo "ceph cluster up in $(printf %.0f "$(el "$t0" "$(now)")") s: $ENDPOINT (OSD file $((CEPH_TEST_OSD_BYTES >> 20)) MiB, sparse, in $CD)"
BUCKET=drclone-bench
"$CLUSTER" s3 "$CD" mb "$BUCKET"
export AWS_ACCESS_KEY_ID=TESTKEY AWS_SECRET_ACCESS_KEY=TESTSECRET
export CEPH_CONF="$CD/ceph.conf"

# fio JOBNAME RW ENGINE-ARGS...: SIZE of 1 MiB sequential I/O; wall seconds in $SECS
FIO=(--bs=1M --iodepth=8 --rw=X --size="$BYTES" --refill_buffers=1 --randrepeat=0
     --buffer_compress_percentage=0 --end_fsync=1 --group_reporting --output="$B/fio.out")
SECS=
fio_run() {
  local name=$1 rw=$2 t0 t1
  shift 2
  t0=$(now)
  fio --name="$name" "${FIO[@]/--rw=X/--rw=$rw}" "$@" || { cat "$B/fio.out" >&2; exit 1; }
  t1=$(now)
  SECS=$(el "$t0" "$t1")
}

# --- drclone stores: serve STORE (unix socket $STORE.sock), pid in $SERVE
SERVE=
serve() {
  "$DRCLONE" --store "$1" serve --no-tcp --socket "$1.sock" --replication-listen off \
      >/dev/null 2>>"$1.log" &
  SERVE=$!
  PIDS+=("$SERVE")
  for _ in $(seq 600); do [ -S "$1/control.sock" ] && [ -S "$1.sock" ] && return; sleep 0.05; done
  echo "serve $1 did not start" >&2; cat "$1.log" >&2; exit 1
}
stop() { kill -TERM "$SERVE"; wait "$SERVE" 2>/dev/null || true; SERVE=; }
NBD=()
nbd() { NBD=(--ioengine=nbd "--uri=nbd+unix:///g/d?socket=$1.sock"); }
backlog() { # STORE: "PACKS BYTES" of group g's upload backlog
  "$DRCLONE" --store "$1" --json status | /usr/bin/python3 -c '
import json, sys
b = json.load(sys.stdin)[0]["upload_backlog"]
print(b["packs"], b["bytes"])'
}
du_b() { du -s --block-size=1 "$1" | cut -f1; }
declare -A R

run_drclone() { # KIND (local|s3) INIT-ARGS...
  local kind=$1 s="$B/$1" t0 t1 p b
  shift
  "$DRCLONE" --store "$s" init "$@" >/dev/null
  "$DRCLONE" --store "$s" group create g >/dev/null
  "$DRCLONE" --store "$s" volume create g/d --size "${SIZE_MIB}M" >/dev/null
  serve "$s"
  nbd "$s"
  R[$kind.du_empty]=$(du_b "$s")
  sync
  t0=$(now)
  fio_run "$kind-write" write "${NBD[@]}"
  R[$kind.write]=$SECS
  if [ "$kind" = s3 ]; then
    # A recovery point seals the open pack (and checkpoints the catalog); then
    # wait until nothing is left to upload.
    "$DRCLONE" --store "$s" point create g >/dev/null
    while :; do
      read -r p b < <(backlog "$s")
      [ "$p" = 0 ] && [ "$b" = 0 ] && break
      [ "$(printf %.0f "$(el "$t0" "$(now)")")" -lt 1800 ] || { echo "uploads did not drain: $p packs, $b bytes" >&2; exit 1; }
      sleep 0.2
    done
    t1=$(now)
    R[s3.uploaded]=$(el "$t0" "$t1")
    R[s3.du_drained]=$(du_b "$s")
    R[s3.du_parts]=$(cd "$s" && du -s --block-size=1M -- * | sort -rn | head -4 | awk '{printf "%s %s MiB, ", $2, $1}')
  else
    "$DRCLONE" --store "$s" point create g >/dev/null
    R[local.du]=$(du_b "$s")
  fi
  # A fresh daemon: empty chunk cache, and for S3 an empty read cache.
  stop
  serve "$s"
  fio_run "$kind-read1" read "${NBD[@]}"
  R[$kind.read1]=$SECS
  fio_run "$kind-read2" read "${NBD[@]}"
  R[$kind.read2]=$SECS
  [ "$kind" = s3 ] && R[s3.du_cached]=$(du_b "$s")
  stop
  rm -rf "$s" "$s.sock"
}

echo "drclone, local packs"
run_drclone local
echo "drclone, S3 backend (radosgw)"
run_drclone s3 --backend "s3://$BUCKET/bench" --s3-endpoint "$ENDPOINT" --cache-size $((2 * BYTES))
S3_OBJ_BYTES=$("$CLUSTER" s3 "$CD" ls "$BUCKET" bench/packs/ | awk '{s += $2} END {print s + 0}')

echo "radosgw ingest: curl PUTs of 64 MiB objects"
mkdir "$B/raw"
head -c "$BYTES" /dev/urandom | split -b 64M - "$B/raw/o"
sync
curl_put() { # OBJECT-PREFIX FILE
  curl -sSf --aws-sigv4 aws:amz:us-east-1:s3 --user TESTKEY:TESTSECRET \
    -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' -T "$2" "$ENDPOINT/$BUCKET/$1/${2##*/}"
}
export -f curl_put; export ENDPOINT BUCKET
for par in 1 4; do
  t0=$(now)
  if ls "$B"/raw/o* | xargs -P "$par" -n 1 bash -c 'curl_put "raw$0" "$1"' "$par"; then
    R[curl$par]=$(el "$t0" "$(now)")
  else
    R[curl$par]=
  fi
done
rm -rf "$B/raw"

echo "Ceph RBD (fio --ioengine=rbd)"
ceph osd pool create rbd 8 8 >/dev/null
rbd pool init rbd
rbd create --size "${SIZE_MIB}M" rbd/bench
RBD=(--ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench)
fio_run rbd-write write "${RBD[@]}"; R[rbd.write]=$SECS
fio_run rbd-read1 read "${RBD[@]}"; R[rbd.read1]=$SECS
fio_run rbd-read2 read "${RBD[@]}"; R[rbd.read2]=$SECS

LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
mbs() { echo "$BYTES / $1 / 1000000" | bc -l; }
r() { echo "scale=3; $1 / $2" | bc -l; }
printf '\n%s MiB, fio 1 MiB sequential, iodepth 8, incompressible random data; %s cores, load %s at start, %s at end\n' \
  "$SIZE_MIB" "$(nproc)" "$LOAD0" "$LOAD1"
printf '%-44s %10s %10s %10s\n' "MB/s" "write" "read 1" "read 2"
printf '%-44s %10.0f %10.0f %10.0f\n' "drclone, local packs" "$(mbs "${R[local.write]}")" "$(mbs "${R[local.read1]}")" "$(mbs "${R[local.read2]}")"
printf '%-44s %10.0f %10.0f %10.0f\n' "drclone, S3 backend (write acknowledged)" "$(mbs "${R[s3.write]}")" "$(mbs "${R[s3.read1]}")" "$(mbs "${R[s3.read2]}")"
printf '%-44s %10.0f\n' "drclone, S3 backend (write uploaded)" "$(mbs "${R[s3.uploaded]}")"
for par in 1 4; do
  if [ -n "${R[curl$par]}" ]; then
    printf '%-44s %10.0f\n' "radosgw ingest, curl PUT 64 MiB x$par at once" "$(mbs "${R[curl$par]}")"
  else
    printf '%-44s %10s\n' "radosgw ingest, curl PUT 64 MiB x$par at once" failed
  fi
done
printf '%-44s %10.0f %10.0f %10.0f\n' "Ceph RBD (librbd)" "$(mbs "${R[rbd.write]}")" "$(mbs "${R[rbd.read1]}")" "$(mbs "${R[rbd.read2]}")"
echo "(drclone read 1 is after a restart of serve: S3 cold, from radosgw; read 2 is warm, from the local read cache)"
printf '\n%-56s %8s   %s\n' ratio value target
printf '%-56s %7.2fx   %s\n' "S3 warm read / local packs read (2nd reads)" "$(r "${R[local.read2]}" "${R[s3.read2]}")" ">= 0.8x"
printf '%-56s %7.2fx\n' "S3 cold read / local packs read (1st reads)" "$(r "${R[local.read1]}" "${R[s3.read1]}")"
printf '%-56s %7.2fx   %s\n' "S3 write, uploaded / RBD write" "$(r "${R[rbd.write]}" "${R[s3.uploaded]}")" ">= 0.5x"
printf '%-56s %7.2fx\n' "S3 write, acknowledged / RBD write" "$(r "${R[rbd.write]}" "${R[s3.write]}")"
[ -n "${R[curl4]}" ] && printf '%-56s %7.2fx\n' "S3 write, uploaded / radosgw ingest (curl x4)" "$(r "${R[curl4]}" "${R[s3.uploaded]}")"
printf '%-56s %7.2fx\n' "S3 write, uploaded / local packs write" "$(r "${R[local.write]}" "${R[s3.uploaded]}")"
printf '%-56s %7.2fx\n' "S3 cold read / RBD read (1st reads)" "$(r "${R[rbd.read1]}" "${R[s3.read1]}")"
pertb() { echo "$1 * 1000000000000 / $BYTES / 1000000000" | bc -l; }
printf '\nlocal disk per TB of logical data (du of the store directory):\n'
printf '  %-52s %8.1f GB/TB (%s bytes; %s)\n' "S3 backend, uploads drained, read cache empty" "$(pertb "${R[s3.du_drained]}")" "${R[s3.du_drained]}" "${R[s3.du_parts]%, }"
printf '  %-52s %8.1f GB/TB (%s bytes)\n' "  the same less the empty store's (fixed) size" "$(pertb "$((R[s3.du_drained] - R[s3.du_empty]))")" "$((R[s3.du_drained] - R[s3.du_empty]))"
printf '  %-52s %8.1f GB/TB (%s bytes)\n' "S3 backend, after the warm read (cache filled)" "$(pertb "${R[s3.du_cached]}")" "${R[s3.du_cached]}"
printf '  %-52s %8.1f GB/TB (%s bytes)\n' "local packs" "$(pertb "${R[local.du]}")" "${R[local.du]}"
printf '  %-52s %8s    (%s bytes local packs, %s bytes S3)\n' "an empty store (init, volume create, serve)" "" "${R[local.du_empty]}" "${R[s3.du_empty]}"
printf '  pack objects in the bucket: %s bytes (%.3fx the logical data)\n' "$S3_OBJ_BYTES" "$(r "$S3_OBJ_BYTES" "$BYTES")"
