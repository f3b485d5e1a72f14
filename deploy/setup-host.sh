#!/usr/bin/env bash
# Idempotent machine set-up for ebpf-apm: Debian packages (BCC, kernel headers, Go 1.19),
# the kernel-header links BCC looks for, tracefs/debugfs mounts, and the project's .venv.
# Safe to run again: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root

say() { printf 'setup: %s\n' "$*"; }
need_root() {
    if [ "$(id -u)" != 0 ]; then
        say "must run as root (BPF, tracefs mounts and apt-get need it); try: sudo make setup"
        exit 2
    fi
}
need_root

# prometheus, chromium and stunnel4 are test parts: a real scraper, a real browser, a TLS front.
DEB_PACKAGES=(python3-bpfcc linux-headers-amd64 golang-1.19-go golang-google-grpc-dev golang-golang-x-net-dev golang-github-lib-pq-dev postgresql prometheus chromium stunnel4)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# BCC looks for headers at /lib/modules/$(uname -r)/{build,source}. This kernel ships none
# (no modules, no IKHEADERS), so point them at Debian's newest installed header package.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/Makefile" ] || [ ! -e "$kdir/source/include/linux/kconfig.h" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
    [ -n "$hdr" ] || { say "no /usr/src/linux-headers-*-amd64 found; install linux-headers-amd64"; exit 1; }
    common="${hdr%-amd64}-common"
    mkdir -p "$kdir"
    ln -sfn "$hdr" "$kdir/build"
    ln -sfn "$common" "$kdir/source"
    say "linked $kdir/build -> $hdr"
fi

mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug
if [ ! -e /sys/kernel/debug/tracing/uprobe_events ] && [ -d /sys/kernel/debug/tracing ]; then
    mountpoint -q /sys/kernel/debug/tracing || mount -t tracefs nodev /sys/kernel/debug/tracing || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $($PY --version)"
    $PY -m venv .venv
fi
# Debian's bcc is pure Python over libbcc.so: expose just that package to the venv.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing the project into .venv"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
.venv/bin/python -c 'import bcc' || { say "bcc does not import in .venv"; exit 1; }
say "ready"
