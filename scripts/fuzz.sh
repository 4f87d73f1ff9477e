#!/usr/bin/env bash
# Fuzz the NBD option/request decoders and the journal/pack record parsers
# (fuzz/, cargo-fuzz + libFuzzer, docs/DESIGN.md §16) for a bounded time.
#
#   DRCLONE_FUZZ_SECONDS   seconds per target (default 30)
#   DRCLONE_FUZZ_TARGETS   space-separated subset of targets (default: all)
#
# Installs cargo-fuzz if it is missing, builds every target with AddressSanitizer
# and debug assertions, then runs each on a copy of its committed seed corpus
# (fuzz/corpus/<target>/; what a run grows stays outside the clone).  Exits non-zero
# if any target crashes, printing the crashing input's path and a hex dump.
# Only stable Rust exists here: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${DRCLONE_FUZZ_SECONDS:-30}"
export CARGO_TARGET_DIR="$HOME/.cache/drclone-fuzz-target"
export RUSTC_BOOTSTRAP=1
LOCK=/tmp/drclone-cargo.lock
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
RUNS="$CARGO_TARGET_DIR/runs"

log() { echo "fuzz: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# stage NAME CMD...: run CMD and print how long it took.
stage() {
  local name=$1 t0 rc=0
  shift
  t0=$(date +%s.%N)
  "$@" || rc=$?
  log "$(printf '%-28s %7.1f s' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)")"
  return $rc
}
# locked NAME CMD...: run CMD holding the cargo lock (other agents and scripts build
# on the same 2 cores), timing the wait for the lock apart from CMD itself.
locked() {
  local name=$1 rc=0
  shift
  exec 9>>"$LOCK"
  stage "wait for the cargo lock" flock 9
  stage "$name" "$@" 9>&- || rc=$?
  flock -u 9
  exec 9>&-
  return $rc
}

# The targets include these files by #[path] instead of depending on the drclone
# crate (which would build RocksDB with sanitizer flags).  They must stay pure:
# std and crc32fast only, nothing from `crate::` or another dependency.
PURE=(src/nbd/proto.rs src/engine/format/pack.rs src/engine/format/journal.rs)
deps=$(sed -n '/^\[dependencies\]/,/^\[/{s/^\([A-Za-z0-9_-]*\) *=.*/\1/p}' Cargo.toml |
       tr '-' '_' | grep -vx crc32fast | paste -sd'|')
impure=0
for f in "${PURE[@]}"; do
  [ -f "$f" ] || die "$f is missing: the fuzz targets include it by path (fuzz/fuzz_targets/)"
  # Code lines only (comments dropped), then anything reaching outside the file.
  hits=$(sed -e 's://.*$::' "$f" | grep -nE "(^|[^A-Za-z0-9_])(crate|${deps})::|^\s*(pub\s+)?use\s+(crate|${deps})\b" || true)
  if [ -n "$hits" ]; then
    impure=1
    log "ERROR: $f is no longer pure; the fuzz targets include it by #[path] and"
    log "       can use only std and crc32fast in it.  Offending lines:"
    echo "$hits" | sed "s|^|       $f:|" >&2
  fi
done
[ $impure -eq 0 ] || die "move the engine-dependent code out of the file(s) above, or give the fuzz crate what they need (fuzz/Cargo.toml)"

# cargo-fuzz itself (crates.io), once per machine.
if ! cargo fuzz --version >/dev/null 2>&1; then
  locked "install cargo-fuzz" env CARGO_TARGET_DIR="$CARGO_TARGET_DIR/install" cargo install cargo-fuzz --locked
fi
log "$(cargo fuzz --version), $(rustc --version), ${SECS} s per target"

ALL=$(cd fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//')
TARGETS=${DRCLONE_FUZZ_TARGETS:-$ALL}
locked "build (all targets)" cargo fuzz build --release --sanitizer address \
  || die "build failed (see above)"

# run_target BIN WORK: libFuzzer on WORK/corpus for SECS seconds, log in WORK/log.
run_target() {
  "$1" "$2/corpus" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=512 -print_final_stats=1 -artifact_prefix="$2/artifacts/" >"$2/log" 2>&1
}

failed=()
for t in $TARGETS; do
  bin="$CARGO_TARGET_DIR/$TRIPLE/release/$t"
  [ -x "$bin" ] || die "no fuzz binary $bin (targets: $(echo $ALL))"
  [ -d "fuzz/corpus/$t" ] || die "no seed corpus fuzz/corpus/$t"
  work="$RUNS/$t"
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  cp fuzz/corpus/"$t"/* "$work/corpus/"
  rc=0
  # -rss_limit_mb/-malloc_limit_mb: a decoder that allocates by a length it read
  # (before checking it) fails here as an OOM.
  stage "run $t" run_target "$bin" "$work" || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/log")
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9a-zA-Z]+' "$work/log" | tail -1 || true)
  log "  $t: ${execs:-?} executions, $cov, exit $rc"
  crashes=$(find "$work/artifacts" -type f | sort)
  if [ $rc -ne 0 ] || [ -n "$crashes" ]; then
    failed+=("$t")
    log "  $t FAILED; from libFuzzer's log ($work/log):"
    grep -m1 -A6 -E 'panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)' "$work/log" >&2 || tail -20 "$work/log" >&2
    grep -E '^\s+#[0-9]+ 0x.*/fuzz/' "$work/log" | head -5 >&2 || true
    sed -n '/^SUMMARY:/,/^Base64/p' "$work/log" | grep -v '^0x' >&2 || true
    for c in $crashes; do
      log "  crashing input: $c ($(stat -c %s "$c") bytes); reproduce with:"
      log "    $bin $c"
      od -A x -t x1z -v "$c" | head -64 >&2
    done
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  die "crashed: ${failed[*]}"
fi
log "all targets ran ${SECS} s with no crash: $(echo $TARGETS)"
