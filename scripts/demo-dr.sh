#!/usr/bin/env bash
# The DR story on a real VM (run by scripts/demo.sh after the engine tour, or on
# its own after `bash scripts/setup.sh` and a build):
#   protect a small Debian guest (tools/make-guest, cached per machine), take a
#   recovery point, drill it with a boot check (the guest boots from an O(1)
#   clone over NBD under qemu), replicate more, fail over to the point (the
#   production names now serve it, nothing copied), boot the failed-over disk,
#   undo, and show status and the audit log.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DRCLONE="${DRCLONE:-$CARGO_TARGET_DIR/release/drclone}"
WORK="${DRCLONE_DEMO_DIR:-$(mktemp -d /tmp/drclone-dr-demo.XXXXXX)}"
export DRCLONE_STORE="$WORK/dr-store"
say() { printf '\n== %s\n' "$*"; }

say "the protected VM: a small Debian guest (built once per machine, then cached)"
GUEST=$(tools/make-guest)
ls -l "$GUEST"

say "protect it: store, group vm, import the disk, a recovery point"
"$DRCLONE" init
"$DRCLONE" group create vm
"$DRCLONE" volume create vm/root --size "$(stat -c %s "$GUEST")"
"$DRCLONE" import vm/root "$GUEST"
"$DRCLONE" point create vm --label protected

say "serve it over NBD (the DR host's daemon)"
SOCK="$WORK/nbd.sock"
"$DRCLONE" serve --no-tcp --socket "$SOCK" >/dev/null &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 200); do [ -S "$SOCK" ] && [ -S "$DRCLONE_STORE/control.sock" ] && break; sleep 0.1; done

say "DR drill: boot the recovered VM from an O(1) clone of the point (qemu, TCG here)"
"$DRCLONE" test vm --exec "tools/boot-check --timeout 600"
"$DRCLONE" drill list

say "replication goes on: the replica head moves past the point"
qemu-io -f raw "nbd+unix:///vm/root?socket=$SOCK" -c "write -P 0x5a 1000M 4M" -c flush | tail -2
"$DRCLONE" export vm/root "$WORK/replica-before.img"

say "disaster: fail over to the point; the production name vm/root now serves it"
"$DRCLONE" failover vm --point latest
tools/boot-check --timeout 600 "nbd+unix:///vm/root?socket=$SOCK"
"$DRCLONE" status

say "undo the failover: vm/root is the replica head again, exactly"
"$DRCLONE" failover vm --undo
"$DRCLONE" export vm/root "$WORK/replica-after.img"
cmp "$WORK/replica-before.img" "$WORK/replica-after.img" && echo "the replica head is back, byte for byte"
rm -f "$WORK/replica-before.img" "$WORK/replica-after.img"

say "the audit trail"
"$DRCLONE" audit
echo
echo "DR demo OK; store at $DRCLONE_STORE"
