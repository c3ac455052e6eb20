# shellcheck shell=bash
#
# scripts/lib/netns.sh -- throw-away network namespaces with an extra,
# non-loopback address, for vios-bridge tests that need a listener RabbitMQ
# does not consider "loopback" (loopback_users: guest may only log in over a
# connection whose LOCAL address is a loopback address).
#
# This machine's kernel has no dummy interfaces, so the extra address
# (default 198.18.0.1/32, RFC 2544 benchmarking space) goes on the `lo` of a
# fresh namespace.  The namespace has no route to anywhere else: EVERYTHING
# the test needs -- the broker, vios-host-bridge, the clients -- must run
# inside it (`netns_exec NAME cmd...`, or `CLUSTER_NETNS=NAME cluster_...`
# from cluster.sh, which records the name and enters it for every later
# call).  Inside, 127.0.0.1 still is loopback (guest/guest accepted) and
# 198.18.0.1 is not (guest/guest refused with 403 ACCESS_REFUSED).
# Requires root (ip netns) and iproute2.
#
# Source this file (it is safe under `set -euo pipefail`) and use:
#
#   netns_name [PREFIX]
#       Print a fresh, unused namespace name: PREFIX-<pid>-<random>
#       (PREFIX defaults to vios-test).
#
#   netns_create NAME [ADDR/PREFIXLEN...]
#       Create namespace NAME (must not exist yet), bring its `lo` up and add
#       each address to `lo` (default: $NETNS_ADDR, itself defaulting to
#       198.18.0.1/32).  On failure deletes what it created, returns non-zero.
#
#   netns_exec NAME CMD [ARGS...]
#       Run CMD inside the namespace (ip netns exec; the process keeps its
#       pid, environment and current directory).
#
#   netns_delete NAME
#       SIGTERM every process still inside the namespace (the pids `ip netns
#       pids` lists; never the caller or its ancestors), SIGKILL after
#       $NETNS_STOP_TIMEOUT s (default 10), then delete the namespace.
#       Stop brokers gracefully first (cluster_stop) if that matters.
#       Idempotent, never fails, safe in an EXIT trap.
#
#   netns_addr NAME
#       Print the IPv4 addresses on the namespace's lo other than 127.0.0.1,
#       one per line, without prefix length.
#
# Nothing is killed by name: only pids inside the namespace.

NETNS_ADDR=${NETNS_ADDR:-198.18.0.1/32}

_netns_log() { printf 'netns: %s\n' "$*" >&2; }

_netns_valid() {
    [[ ${1:-} =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]
}

_netns_exists() {
    [[ -e /run/netns/$1 ]]
}

netns_name() {
    local prefix=${1:-vios-test} name
    while :; do
        name="$prefix-$$-$RANDOM"
        _netns_exists "$name" || break
    done
    echo "$name"
}

netns_create() {
    local IFS=$' \t\n'
    local name=${1:-}
    if ! _netns_valid "$name"; then
        _netns_log "usage: netns_create NAME [ADDR/PREFIXLEN...] (invalid name '$name')"
        return 2
    fi
    shift
    local addrs=("$@")
    ((${#addrs[@]} > 0)) || addrs=("$NETNS_ADDR")
    if _netns_exists "$name"; then
        _netns_log "namespace $name already exists"
        return 1
    fi
    local err
    if ! err=$(ip netns add "$name" 2>&1); then
        _netns_log "ip netns add $name failed: $err"
        return 1
    fi
    local a
    if ! err=$(ip -n "$name" link set lo up 2>&1); then
        _netns_log "bringing lo up in $name failed: $err"
        ip netns del "$name" 2>/dev/null || true
        return 1
    fi
    for a in "${addrs[@]}"; do
        if ! err=$(ip -n "$name" addr add "$a" dev lo 2>&1); then
            _netns_log "adding $a to lo in $name failed: $err"
            ip netns del "$name" 2>/dev/null || true
            return 1
        fi
    done
    _netns_log "created namespace $name: lo up with 127.0.0.1 and ${addrs[*]}"
    return 0
}

netns_exec() {
    local name=${1:?netns_exec NAME CMD...}
    shift
    ip netns exec "$name" "$@"
}

netns_addr() {
    local name=${1:?netns_addr NAME}
    ip -n "$name" -o -4 addr show dev lo 2>/dev/null |
        awk '{ split($4, a, "/"); if (a[1] != "127.0.0.1") print a[1] }'
}

# _netns_protected -> our own pid and all our ancestors (never signalled)
_netns_protected() {
    local p=$$
    echo "${BASHPID:-$$}"
    while [[ $p =~ ^[0-9]+$ ]] && ((p > 1)); do
        echo "$p"
        p=$(ps -o ppid= -p "$p" 2>/dev/null | tr -dc '0-9')
    done
}

# _netns_victims NAME -> pids inside NAME except the caller and its ancestors
_netns_victims() {
    local protected
    protected=" $(_netns_protected | tr '\n' ' ') "
    local p
    for p in $(ip netns pids "$1" 2>/dev/null || true); do
        [[ $protected == *" $p "* ]] || echo "$p"
    done
}

netns_delete() {
    local IFS=$' \t\n'
    local name=${1:-}
    _netns_valid "$name" || return 0
    _netns_exists "$name" || return 0
    local pids p n=0 deadline
    pids=$(_netns_victims "$name")
    if [[ -n $pids ]]; then
        for p in $pids; do
            kill -TERM "$p" 2>/dev/null && n=$((n + 1))
        done
        deadline=$((SECONDS + ${NETNS_STOP_TIMEOUT:-10}))
        while [[ -n $(_netns_victims "$name") ]] && ((SECONDS < deadline)); do
            sleep 0.1
        done
        for p in $(_netns_victims "$name"); do
            kill -KILL "$p" 2>/dev/null || true
        done
        for ((p = 0; p < 30; p++)); do
            [[ -z $(_netns_victims "$name") ]] && break
            sleep 0.1
        done
    fi
    ip netns del "$name" 2>/dev/null || true
    _netns_log "deleted namespace $name${pids:+ (signalled $n leftover process(es))}"
    return 0
}
