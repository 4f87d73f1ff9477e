# shellcheck shell=bash
# Helpers shared by tools/make-guest and tools/boot-check. Source it; do not run it.
# Adapted from the recipes in ../shared/vm/lib.sh, which were proven on this
# machine kind (Debian 12, 2 cores, no usable KVM).

# Print a message on stderr, prefixed with the calling tool's name.
log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Seconds since the epoch, with milliseconds (for timings).
now() { date +%s.%N | cut -c1-14; }
# elapsed START -> "12.3" (seconds since START, one decimal)
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The Debian mirror apt itself uses for the main suite (deb822 *.sources first,
# then one-line *.list), skipping the security archive. debootstrap must use the
# same mirror: on machines with a closed network it is the only one that answers.
apt_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' "$f" |
              grep -v -- '-security' | head -n1)
        [ -n "$uri" ] && { echo "${uri%/}"; return 0; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(sed -e 's/\[[^]]*\]//' "$f" |
              awk '$1 == "deb" && $2 !~ /-security/ && $3 !~ /-security/ { print $2; exit }')
        [ -n "$uri" ] && { echo "${uri%/}"; return 0; }
    done
    return 1
}

# Is KVM usable? Only if the CPU shows vmx/svm AND /dev/kvm opens read-write.
# On this machine kind /dev/kvm exists and opens, but the CPU hides vmx/svm, and
# a guest under -accel kvm dies in syslinux with "KVM internal error".
kvm_usable() {
    [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ] &&
        grep -qE '^flags.*\b(vmx|svm)\b' /proc/cpuinfo
}

# Is PID a live process? A zombie does not count (kill -0 says yes to it).
alive() {
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

# Stop one process we started, by PID: TERM, wait up to 10 s, then KILL; reap it.
stop_pid() {
    local pid=$1 i
    [ -n "$pid" ] || return 0
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        alive "$pid" && { kill -KILL "$pid" 2>/dev/null || true; }
    fi
    wait "$pid" 2>/dev/null || true
    return 0
}
