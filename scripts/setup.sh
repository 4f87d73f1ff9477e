#!/usr/bin/env bash
# Installs every system package drclone needs to build, run and test.
# Idempotent: skips apt-get when everything is already present.
set -euo pipefail
PKGS=(libclang-dev clang pkg-config build-essential
      qemu-utils libnbd-bin python3-libnbd nbdkit fio
      fuse3 e2fsprogs util-linux debootstrap xz-utils bc)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
