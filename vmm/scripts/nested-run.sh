#!/usr/bin/env bash
# Runs rayos-vmm tests under nested KVM: QEMU TCG (emulated AMD-V) boots an outer kernel whose
# /init is rayos-vmm-testinit, which runs rayos-vmm on each spec named in TESTS.
#
# Usage: nested-run.sh WORKDIR TESTS [extra outer cmdline]
#   WORKDIR holds: outer-bzImage, guest-bzImage, [modules/*.ko + modules.order for the outer
#   kernel], specs/<test>.json (+ .ctl), [guest-initrd] and [files/* copied to the outer root].
#   TESTS: comma-separated spec names. Binaries come from the static release build: RAYOS_BIN_DIR,
#   else $CARGO_TARGET_DIR (or the workspace's target/) /x86_64-unknown-linux-gnu/release.
# Prints the outer serial console; exit code is QEMU's.
set -euo pipefail
work=$(realpath "$1"); tests=$2; extra=${3:-}
bin=$(realpath "${RAYOS_BIN_DIR:-${CARGO_TARGET_DIR:-$(dirname "$0")/../../target}/x86_64-unknown-linux-gnu/release}")
root=$work/outer-root
rm -rf "$root" && mkdir -p "$root"/{specs,guest,dev,proc,sys,tmp,run}
cp "$bin/rayos-vmm-testinit" "$root/init"
cp "$bin/rayos-vmm" "$root/rayos-vmm"
cp "$work"/specs/* "$root/specs/"
cp "$work/guest-bzImage" "$root/guest/bzImage"
[ -f "$work/guest-initrd" ] && cp "$work/guest-initrd" "$root/guest/initrd"
if [ -d "$work/modules" ]; then
  cp "$work"/modules/*.ko "$root/"
  sed 's|^|/|' "$work/modules.order" > "$root/modules.order"
fi
[ -d "$work/files" ] && cp -a "$work"/files/. "$root/"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | zstd -q -1 -f -o "$work/outer-initrd.zst")
exec timeout "${NESTED_TIMEOUT:-300}" qemu-system-x86_64 -accel tcg -cpu EPYC,+svm,+npt -m "${NESTED_MEM:-2048}" -smp 2 \
  -nographic -no-reboot -kernel "$work/outer-bzImage" -initrd "$work/outer-initrd.zst" \
  -append "console=ttyS0 panic=-1 quiet rayos.vmmtest=$tests $extra"
