#!/usr/bin/env bash
# Installs every system package drclone needs to build, run and test.
# Idempotent: skips apt-get when everything is already present.
set -euo pipefail
PKGS=(libclang-dev clang pkg-config build-essential
      qemu-utils libnbd-bin python3-libnbd nbdkit fio
      fuse3 e2fsprogs util-linux debootstrap xz-utils bc
      syslinux syslinux-common mtools dosfstools fdisk rsync openssl fuse2fs
      ceph-mon ceph-mgr ceph-osd radosgw ceph-common python3-boto3 uuid-runtime curl)
# qemu-system-x86 (tools/boot-check) must match qemu-utils' version: qemu-utils 10.x
# from bookworm-backports declares "Breaks: qemu-system-common (<< 1:8.0)", so
# bookworm's qemu-system-x86 7.2 cannot sit next to it.  Take it from the suite
# qemu-utils came from, adding bookworm-backports (on apt's own mirror) if needed.
QEMU_PKGS=(qemu-system-x86)
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
# missing_of PKG...: sets the array `missing` to those not installed.
missing_of() {
  missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}
missing_of "${PKGS[@]}"
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

missing_of "${QEMU_PKGS[@]}"
if [ ${#missing[@]} -gt 0 ]; then
  target=()
  if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '~bpo12'; then
    target=(-t bookworm-backports)
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      # The mirror apt already uses for bookworm (deb822 or one-line sources).
      mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
               awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' | grep -v -- -security | head -n1)
      [ -n "$mirror" ] || mirror=$(sed -e 's/\[[^]]*\]//' /etc/apt/sources.list 2>/dev/null |
               awk '$1 == "deb" && $2 !~ /-security/ && $3 !~ /-security/ { print $2; exit }')
      mirror=${mirror:-http://deb.debian.org/debian}
      echo "setup: adding bookworm-backports from ${mirror%/}" >&2
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "${mirror%/}" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
    fi
  fi
  echo "setup: installing ${missing[*]} ${target[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${target[@]}" "${missing[@]}" >/dev/null
fi
