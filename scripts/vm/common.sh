# shellcheck shell=bash
#
# scripts/vm/common.sh -- helpers shared by scripts/vm/build-image and
# scripts/vm/run-vm. Source it; it is safe under `set -euo pipefail`.
#
#   VM_REPO_ROOT           absolute path of the repository (two levels up)
#   vm_log MSG...          "<script>: MSG" on stderr
#   vm_die MSG...          vm_log, then exit 1
#   vm_ensure_packages P.. install the Debian packages P that are missing
#                          (apt-get only when something is missing; one
#                          `apt-get update` and a retry if the install fails)
#   vm_extract_vmlinux VMLINUZ OUT
#                          write the uncompressed kernel of the bzImage
#                          VMLINUZ to OUT; status 0 only if OUT is an ELF
#                          kernel QEMU can boot directly (PVH entry)

# shellcheck disable=SC2034 # used by the scripts that source this file
VM_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VM_PROG=$(basename "$0")

vm_log() { printf '%s: %s\n' "$VM_PROG" "$*" >&2; }
vm_die() { vm_log "error: $*"; exit 1; }

vm_ensure_packages() {
    local p missing=()
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return 0

    local sudo=""
    [[ $(id -u) == 0 ]] || sudo=sudo
    vm_log "installing ${missing[*]}"
    # Try with the current package lists first; a fresh machine may have
    # none (or stale ones), so update and retry once.
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >/dev/null 2>&1; then
        $sudo apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# The uncompressed kernel (ELF vmlinux), like the kernel's
# scripts/extract-vmlinux: find the compressed payload inside the bzImage and
# inflate it. QEMU boots an ELF kernel that has a PVH entry point
# (XEN_ELFNOTE_PHYS32_ENTRY, note type 0x12) directly, skipping the
# in-guest decompression, which takes seconds under TCG. Needs file, readelf
# (binutils) and the decompressors (xz-utils, gzip, zstd).
vm_extract_vmlinux() {
    local vmlinuz=$1 out=$2 magic tool off
    for magic in 'xz:\xfd7zXZ\x00' 'gzip:\x1f\x8b\x08' 'zstd:\x28\xb5\x2f\xfd'; do
        tool=${magic%%:*}
        while read -r off; do
            [[ -n $off ]] || continue
            tail -c +$((off + 1)) "$vmlinuz" | "$tool" -dc >"$out.tmp" 2>/dev/null || true
            if [[ -s $out.tmp ]] && file "$out.tmp" | grep -q 'ELF 64-bit'; then
                mv "$out.tmp" "$out"
                readelf -n "$out" 2>/dev/null | grep -q 'type: (0x00000012)' && return 0
                rm -f "$out"
                return 1
            fi
        done < <(LC_ALL=C grep -obUaP "${magic#*:}" "$vmlinuz" | cut -d: -f1 | head -n 3)
    done
    rm -f "$out.tmp"
    return 1
}
