#!/usr/bin/env bash
# Failback benchmark (issue 12), on loopback, side by side in one run:
# an original site O (a drclone store) pushes a SIZE disk of random data to a DR
# site D; D fails over and 1% of the disk is rewritten there (1 MiB regions of
# random data); `drclone failback` sends the change home.  Against it:
# `rsync --inplace --no-whole-file` of the DR disk's file onto the original's
# (no -z), which is what an operator without drclone would run.  Reports bytes
# on the wire (drclone's protocol bytes, rsync's --stats "Total bytes sent") and
# time, with ratios.  Asserts nothing.
# Env: SIZE (default 1G; the issue's case is SIZE=4G, which needs about 3x SIZE
# of free disk at its peak).  Run by scripts/bench-replicate.sh after its own
# cases (BENCH_FAILBACK=0 skips it there).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
build() { flock /tmp/drclone-cargo.lock cargo build --release --locked --all-targets --features failpoints "$@"; }
build >/dev/null 2>&1 || build
DRCLONE="$CARGO_TARGET_DIR/release/drclone"
SIZE="${SIZE:-1G}"
SIZE_MIB=$(($(numfmt --from=iec "$SIZE") >> 20))
[ "$SIZE_MIB" -ge 100 ] || { echo "SIZE must be at least 100M" >&2; exit 2; }
B=$(mktemp -d /tmp/drclone-bench-failback.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$B"; }
trap cleanup EXIT
now() { date +%s.%N; }
el() { echo "$2 - $1" | bc -l; }
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
field() { /usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

# serve SITE: a store under $B/SITE served with NBD and replication ports.
declare -A NBD REPL
serve() {
  local s=$1
  NBD[$s]=$(free_port); REPL[$s]=$(free_port)
  "$DRCLONE" --store "$B/$s" init >/dev/null
  "$DRCLONE" --store "$B/$s" serve --listen "127.0.0.1:${NBD[$s]}" \
      --replication-listen "127.0.0.1:${REPL[$s]}" >/dev/null 2>"$B/$s.log" &
  PIDS+=($!)
  for _ in $(seq 200); do [ -S "$B/$s/control.sock" ] && return; sleep 0.05; done
  echo "serve $s did not start" >&2; exit 1
}
dr() { local s=$1; shift; "$DRCLONE" --store "$B/$s" "$@"; }

echo "preparing ${SIZE_MIB} MiB of random data in $B"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$B/orig.raw"
serve o; serve d
dr o group create g >/dev/null
dr o volume create g/d0 --size "${SIZE_MIB}M" >/dev/null
dr o import g/d0 "$B/orig.raw" >/dev/null
dr o point create g >/dev/null
t0=$(now); dr o --json push g --target "127.0.0.1:${REPL[d]}" > "$B/seed.json"; t1=$(now)
echo "seed push: $(field "$B/seed.json" bytes_sent) bytes in $(el "$t0" "$t1") s"

# Failover at D; 1% rewritten there, in 1 MiB regions of random data.
dr d failover g >/dev/null
CHANGED=$((SIZE_MIB / 100))
/usr/bin/python3 - "nbd://127.0.0.1:${NBD[d]}/g/d0" "$SIZE_MIB" "$CHANGED" <<'EOF'
import nbd, os, random, sys
uri, size_mib, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(12)
h = nbd.NBD()
h.connect_uri(uri)
for mib in sorted(random.sample(range(size_mib), n)):
    h.pwrite(os.urandom(1 << 20), mib << 20)
h.flush()
h.shutdown()
EOF
t0=$(now); dr d --json failback g --target "127.0.0.1:${REPL[o]}" > "$B/failback.json"; t1=$(now)
FB_TIME=$(el "$t0" "$t1")
FB_BYTES=$(field "$B/failback.json" bytes_sent)

# The same change as files, for rsync: the DR disk (exported) onto the original.
dr d export g/d0 "$B/dr.raw" >/dev/null
for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()
rm -rf "$B/o" "$B/d"
t0=$(now)
rsync --inplace --no-whole-file --ignore-times --stats "$B/dr.raw" "$B/orig.raw" > "$B/rsync.txt"
t1=$(now)
RS_TIME=$(el "$t0" "$t1")
RS_BYTES=$(grep "Total bytes sent" "$B/rsync.txt" | tr -dc 0-9)
cmp -s "$B/dr.raw" "$B/orig.raw" || { echo "rsync did not make the files equal" >&2; exit 1; }

printf '\nfailback of 1%% (%d MiB) of a %d MiB disk:\n' "$CHANGED" "$SIZE_MIB"
printf '  %-34s %14s %10s\n' "" "bytes sent" "time (s)"
printf '  %-34s %14d %10.2f\n' "drclone failback" "$FB_BYTES" "$FB_TIME"
printf '  %-34s %14d %10.2f\n' "rsync --inplace --no-whole-file" "$RS_BYTES" "$RS_TIME"
printf '  ratio (drclone / rsync): bytes %.2fx, time %.3fx; changed bytes %d\n' \
  "$(echo "$FB_BYTES / $RS_BYTES" | bc -l)" "$(echo "$FB_TIME / $RS_TIME" | bc -l)" \
  "$((CHANGED << 20))"
