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
