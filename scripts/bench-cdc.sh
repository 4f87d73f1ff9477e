#!/usr/bin/env bash
# Fixed-size vs content-defined chunking on real disk images.
# Builds two Debian trees with debootstrap (minbase, and minbase + python3/perl/curl),
# makes ext4 images of them, re-images the first tree into a bigger file system (new
# layout), shifts the first image by 63 sectors (an old DOS partition offset), then
# runs benches/cdc.rs over them.  Trees are cached in $CDC_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
CDC_DIR="${CDC_DIR:-/var/tmp/drclone-cdc}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$CDC_DIR"
cd "$CDC_DIR"
[ -d treeA/usr ] || debootstrap --variant=minbase bookworm treeA "$MIRROR"
[ -d treeB/usr ] || debootstrap --variant=minbase --include=python3,perl,curl bookworm treeB "$MIRROR"
mk() { # tree image extra-MiB
  local mib=$(( $(du -sm "$1" | cut -f1) * 3 / 2 + $3 ))
  rm -f "$2"; truncate -s "${mib}M" "$2"
  mkfs.ext4 -q -F -E root_owner=0:0 -d "$1" "$2"
}
mk treeA treeA.img 0
mk treeB treeB.img 0
mk treeA treeA2.img 200
{ head -c 32256 /dev/zero; cat treeA.img; } > treeA-shift.img
cd - >/dev/null
DRCLONE_CDC_DIR="$CDC_DIR" cargo bench --locked --bench cdc
