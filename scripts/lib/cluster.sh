# shellcheck shell=bash
#
# scripts/lib/cluster.sh -- throw-away two-node RabbitMQ clusters (and
# single nodes with extra configuration) for vios-bridge tests.
#
# Source this file (it is safe under `set -euo pipefail`; it sources
# broker.sh next to it for the pid helpers) and use:
#
#   cluster_start DIR PORT1 PORT2 [EXTRA_CONF]
#       Start two private RabbitMQ nodes and cluster them.  All state lives
#       under DIR (created if missing): DIR/run (shared epmd, cookie),
#       DIR/n1 and DIR/n2 (mnesia, logs, config, pid files of node 1 / 2).
#       Any earlier state in DIR/n1, DIR/n2 is discarded.
#         * node N: AMQP 0-9-1 *and* AMQP 1.0 (rabbitmq_amqp1_0 plugin) on
#           127.0.0.1:PORT<N>; user guest/guest, vhost "/"; node name
#           vios-c<cksum of DIR>-n<N>@localhost;
#         * ONE private epmd for both nodes on a free loopback port
#           (ERL_EPMD_PORT); never the system epmd on 4369;
#         * Erlang distribution on loopback, port PORT<N>+20000 if free,
#           otherwise a free port; one shared random Erlang cookie;
#         * node 2 joins node 1 (stop_app, join_cluster, start_app);
#         * policy "vios-ha-all" on vhost "/": every queue ("^") is a
#           mirrored classic queue, {"ha-mode":"all",
#           "ha-sync-mode":"automatic"}, so a queue survives the death of
#           either node (quorum queues would need 3 nodes).
#       EXTRA_CONF: extra rabbitmq.conf (new-style) lines, appended to both
#       nodes' config, in which "@PORT@" becomes that node's AMQP port and
#       "@N@" its number, e.g.
#           'proxy_protocol = true'
#           'listeners.tcp.2 = 198.18.0.1:@PORT@'
#       (the 127.0.0.1:PORT<N> listener is "listeners.tcp.1"; with
#       proxy_protocol = true the readiness probes send a PROXY v1 header).
#       Blocks until both ports complete an AMQP 0-9-1 and an AMQP 1.0 (SASL)
#       header handshake and `cluster_status` lists both nodes as running.
#       Timeout: $CLUSTER_START_TIMEOUT s (default 120) for the whole thing;
#       on failure prints log tails, stops everything, returns non-zero.
#       Prints one line with the time taken to stderr.
#
#   cluster_single_start DIR PORT [EXTRA_CONF]
#       The same for a one-node "cluster" (DIR/n1 only, no policy): a
#       broker.sh-like broker that takes EXTRA_CONF, e.g. an extra listener
#       on a non-loopback address.  All cluster_* functions work with N=1.
#
#   CLUSTER_NETNS=NAME cluster_start ... / cluster_single_start ...
#       Run epmd, the nodes, the probes and every later cluster_ctl inside
#       the existing network namespace NAME (see netns.sh).  Recorded in
#       DIR/run/NETNS, so later cluster_* calls need no variable.  (Or run
#       the whole script inside the namespace and leave CLUSTER_NETNS unset.)
#
#   cluster_kill DIR N
#       Crash node N: SIGKILL to its beam pid, its launcher's session and all
#       their descendants (recorded pids only), wait until they are gone and
#       epmd has dropped the name.  The other node and epmd keep running.
#
#   cluster_restart DIR N
#       Start node N again (same state, name and ports) after cluster_kill
#       (or after it died).  Blocks until its port accepts AMQP 0-9-1 + 1.0
#       and every other running node's `cluster_status` lists it as running
#       again.  Timeout: $CLUSTER_START_TIMEOUT s.  Mirrors on it are then
#       being re-synchronised (automatic); use cluster_wait_synced before
#       killing the other node.  Restart a node while the other is running:
#       a node that was not the last one down waits for its peer (RabbitMQ's
#       own rule) and would time out if both are down.
#
#   cluster_stop DIR
#       Stop every node and the epmd started for DIR: SIGTERM to all nodes at
#       once, after $CLUSTER_STOP_TIMEOUT s (default 20) SIGKILL to what is
#       left (recorded pids, their sessions and descendants only).
#       Idempotent, never fails, safe in an EXIT trap.  Leaves DIR in place.
#
#   cluster_ctl DIR N ARGS...
#       rabbitmqctl against node N (its env, shared cookie, namespace), e.g.
#       `cluster_ctl "$d" 2 list_connections peer_host peer_port`.
#
#   cluster_env DIR N VAR
#       Print a recorded value of node N: PORT, NODENAME, DIST_PORT,
#       BEAM_PID, LAUNCH_PID; or of the cluster: EPMD_PORT, EPMD_PID,
#       COOKIE, NETNS, NODES (count).  Non-zero if not recorded.
#
#   cluster_running DIR N
#       Print the node names node N's `cluster_status` reports as running,
#       one per line (non-zero if node N does not answer).
#
#   cluster_alive DIR N
#       0 if node N's VM process is alive.
#
#   cluster_wait_synced DIR [TIMEOUT]
#       Wait (default 60 s) until every queue on vhost "/" has all of its
#       mirrors synchronised (asks any running node).
#
# Nothing is ever killed by name: only the pids recorded under DIR.
#
# Requires: rabbitmq-server (Debian 12: 3.10.x), erlang, iproute2 (ss, ip),
# util-linux (setsid), /usr/bin/python3 (stdlib only, for the probes).

_CLUSTER_LIB_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
if ! declare -F _broker_alive >/dev/null; then
    # shellcheck source=broker.sh
    . "$_CLUSTER_LIB_DIR/broker.sh"
fi
CLUSTER_PY=${CLUSTER_PY:-/usr/bin/python3}

_cluster_log() { printf 'cluster: %s\n' "$*" >&2; }

_cluster_elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# _cluster_netns DIR -> the recorded namespace name (maybe empty)
_cluster_netns() {
    cat -- "$1/run/NETNS" 2>/dev/null || true
}

# _cluster_in DIR CMD... -> run CMD inside DIR's namespace (if any)
_cluster_in() {
    local dir=$1 ns
    shift
    ns=$(_cluster_netns "$dir")
    if [[ -n $ns ]]; then
        ip netns exec "$ns" "$@"
    else
        "$@"
    fi
}

_cluster_port_in_use() {
    [[ -n $(_cluster_in "$1" ss -Hltn "sport = :$2" 2>/dev/null) ]]
}

_cluster_free_port() {
    _cluster_in "$1" "$CLUSTER_PY" -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

_cluster_listener_pid() {
    { _cluster_in "$1" ss -Hltnp "sport = :$2" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2; } || true
}

# _cluster_probe DIR N -> 0 if node N's port completes an AMQP 0-9-1 and an
# AMQP 1.0 header handshake (with a PROXY v1 header first if configured)
_cluster_probe() {
    local nd=$1/n$2 proxy=0 port
    port=$(cat -- "$nd/run/PORT") || return 1
    grep -Eq '^[[:space:]]*proxy_protocol[[:space:]]*=[[:space:]]*true' "$nd/rabbitmq.conf" 2>/dev/null && proxy=1
    _cluster_in "$1" "$CLUSTER_PY" - "$port" "$proxy" <<'EOF'
import socket, sys
port, proxy = int(sys.argv[1]), sys.argv[2] == "1"

def exchange(header, n):
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        if proxy:
            a, p = s.getsockname()
            s.sendall(b"PROXY TCP4 %s 127.0.0.1 %d %d\r\n" % (a.encode(), p, port))
        s.sendall(header)
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf
    finally:
        s.close()

try:
    if exchange(b"AMQP\x00\x00\x09\x01", 1)[:1] != b"\x01":
        sys.exit(2)
    if exchange(b"AMQP\x03\x01\x00\x00", 8) != b"AMQP\x03\x01\x00\x00":
        sys.exit(3)
except OSError:
    sys.exit(1)
sys.exit(0)
EOF
}

_cluster_tail_logs() {
    local dir=$1 f
    for f in "$dir"/run/epmd.log "$dir"/run/ctl.log "$dir"/n*/log/console.log "$dir"/n*/log/*@localhost.log; do
        [[ -s $f ]] || continue
        printf -- '---- tail %s ----\n' "$f" >&2
        tail -n 30 -- "$f" >&2 || true
    done
}

cluster_env() {
    local dir=${1:?cluster_env DIR N VAR} n=${2:?cluster_env DIR N VAR} var=${3:?cluster_env DIR N VAR}
    local f
    for f in "$dir/n$n/run/$var" "$dir/run/$var"; do
        if [[ -f $f ]]; then
            cat -- "$f"
            return 0
        fi
    done
    return 1
}

_cluster_nodes() {
    local c
    c=$(cat -- "$1/run/NODES" 2>/dev/null || true)
    [[ $c =~ ^[0-9]+$ ]] || c=0
    echo "$c"
}

cluster_alive() {
    local dir=${1:?cluster_alive DIR N} n=${2:?cluster_alive DIR N}
    _broker_alive "$(cat -- "$dir/n$n/run/BEAM_PID" 2>/dev/null || true)"
}

cluster_ctl() {
    local dir=${1:?cluster_ctl DIR N ARGS...} n=${2:?cluster_ctl DIR N ARGS...}
    shift 2
    local nd=$dir/n$n
    [[ -f $nd/run/env ]] || { _cluster_log "no node $n in $dir"; return 1; }
    local cookie
    cookie=$(cat -- "$dir/run/COOKIE") || return 1
    (
        set +eu
        # shellcheck disable=SC1091
        . "$nd/run/env"
        _cluster_in "$dir" "$BROKER_RABBIT_CTL" -n "$RABBITMQ_NODENAME" --erlang-cookie "$cookie" "$@"
    )
}

# _cluster_ctl_q DIR N ARGS... -> cluster_ctl with output to DIR/run/ctl.log
_cluster_ctl_q() {
    local dir=$1
    printf '+ rabbitmqctl (node %s) %s\n' "$2" "${*:3}" >>"$dir/run/ctl.log"
    cluster_ctl "$@" >>"$dir/run/ctl.log" 2>&1
}

cluster_running() {
    local dir=${1:?cluster_running DIR N} n=${2:?cluster_running DIR N} out
    out=$(cluster_ctl "$dir" "$n" cluster_status --formatter json 2>/dev/null) || return 1
    printf '%s' "$out" | "$CLUSTER_PY" -c '
import json, sys
for n in json.load(sys.stdin).get("running_nodes", []):
    print(n)'
}

# _cluster_launch DIR N -> start node N's VM in the background (no wait)
_cluster_launch() {
    local dir=$1 n=$2
    local nd=$dir/n$n ns
    rm -f -- "$nd/run/rabbit.pid" "$nd/run/BEAM_PID" "$nd/run/LAUNCH_PID" "$nd/run/SID"
    ns=$(_cluster_netns "$dir")
    local nsx=()
    [[ -n $ns ]] && nsx=(ip netns exec "$ns")
    (
        set +eu
        # shellcheck disable=SC1091
        . "$nd/run/env"
        cd -- "$nd" || exit 1
        # `ip netns exec` and `setsid -w` exec (or wait for) the next program,
        # so LAUNCH_PID lives exactly as long as rabbitmq-server does.
        exec ${nsx[@]+"${nsx[@]}"} setsid -w "$BROKER_RABBIT_SERVER"
    ) </dev/null >>"$nd/log/console.log" 2>&1 &
    local launch_pid=$!
    disown "$launch_pid" 2>/dev/null || true
    echo "$launch_pid" >"$nd/run/LAUNCH_PID"
}

# _cluster_wait_up DIR DEADLINE N... -> 0 once every node N accepts AMQP;
# 1 if one died, 2 on timeout (message printed)
_cluster_wait_up() {
    local IFS=$' \t\n'
    local dir=$1 deadline=$2
    shift 2
    local -A ok=()
    local n nd beam launch pending
    while :; do
        pending=0
        for n in "$@"; do
            [[ -n ${ok[$n]:-} ]] && continue
            nd=$dir/n$n
            beam=$(cat -- "$nd/run/BEAM_PID" 2>/dev/null || true)
            if [[ -z $beam && -s $nd/run/rabbit.pid ]]; then
                beam=$(tr -dc '0-9' <"$nd/run/rabbit.pid" 2>/dev/null || true)
                if [[ -n $beam ]]; then
                    echo "$beam" >"$nd/run/BEAM_PID"
                    ps -o sid= -p "$beam" 2>/dev/null | tr -dc '0-9' >"$nd/run/SID" || true
                fi
            fi
            launch=$(cat -- "$nd/run/LAUNCH_PID" 2>/dev/null || true)
            if [[ -n $beam ]]; then
                if ! _broker_alive "$beam"; then
                    _cluster_log "node $n (port $(cat -- "$nd/run/PORT")) died during startup (dir $dir)"
                    return 1
                fi
                if _cluster_probe "$dir" "$n"; then
                    ok[$n]=1
                    continue
                fi
            elif ! _broker_alive "$launch"; then
                _cluster_log "node $n (port $(cat -- "$nd/run/PORT")) died before writing its pid file (dir $dir)"
                return 1
            fi
            pending=1
        done
        ((pending == 0)) && return 0
        if ((SECONDS >= deadline)); then
            _cluster_log "node(s) not accepting AMQP in time: $(for n in "$@"; do [[ -n ${ok[$n]:-} ]] || printf '%s ' "$n"; done)(dir $dir)"
            return 2
        fi
        sleep 0.2
    done
}

# _cluster_wait_member DIR DEADLINE VIEWER N -> 0 once node VIEWER lists
# node N (and VIEWER) as running
_cluster_wait_member() {
    local dir=$1 deadline=$2 viewer=$3 n=$4 name vname running
    name=$(cat -- "$dir/n$n/run/NODENAME")
    vname=$(cat -- "$dir/n$viewer/run/NODENAME")
    while :; do
        running=$(cluster_running "$dir" "$viewer" || true)
        if grep -qxF -- "$name" <<<"$running" && grep -qxF -- "$vname" <<<"$running"; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            _cluster_log "node $viewer does not list $name as running (running: ${running//$'\n'/ }) (dir $dir)"
            return 1
        fi
        cluster_alive "$dir" "$n" || { _cluster_log "node $n died (dir $dir)"; return 1; }
        sleep 0.5
    done
}

# _cluster_write_node DIR N PORT EXTRA_CONF USED_PORTS...
_cluster_write_node() {
    local dir=$1 n=$2 port=$3 extra=$4
    shift 4
    local nd=$dir/n$n
    rm -rf -- "$nd"
    mkdir -p -- "$nd/mnesia" "$nd/log" "$nd/run" "$nd/home" || return 1
    chmod 700 -- "$nd/home"
    # Same cookie for both nodes and the CLI (also passed explicitly).
    printf '%s' "$(cat -- "$dir/run/COOKIE")" >"$nd/home/.erlang.cookie"
    chmod 400 -- "$nd/home/.erlang.cookie"

    local nodename
    nodename="vios-c$(printf '%s' "$dir" | cksum | cut -d' ' -f1)-n$n@localhost"

    local dist_port=$((port + 20000)) p clash=0
    for p in "$@"; do [[ $p == "$dist_port" ]] && clash=1; done
    if ((clash || dist_port > 65535)) || _cluster_port_in_use "$dir" "$dist_port"; then
        while :; do
            dist_port=$(_cluster_free_port "$dir") || return 1
            clash=0
            for p in "$@"; do [[ $p == "$dist_port" ]] && clash=1; done
            ((clash)) || break
        done
    fi

    printf '[rabbitmq_amqp1_0].\n' >"$nd/enabled_plugins"
    : >"$nd/rabbitmq-env.conf" # shadow /etc/rabbitmq/rabbitmq-env.conf
    {
        cat <<EOF
# generated by scripts/lib/cluster.sh -- test node $n
listeners.tcp.1 = 127.0.0.1:$port
default_user = guest
default_pass = guest
default_vhost = /
loopback_users.guest = true
disk_free_limit.absolute = 10MB
log.file.level = info
log.console = false
amqp1_0.default_user = guest
amqp1_0.default_vhost = /
EOF
        if [[ -n $extra ]]; then
            printf '# EXTRA_CONF\n'
            local e=${extra//@PORT@/$port}
            printf '%s\n' "${e//@N@/$n}"
        fi
    } >"$nd/rabbitmq.conf"

    echo "$port" >"$nd/run/PORT"
    echo "$dist_port" >"$nd/run/DIST_PORT"
    echo "$nodename" >"$nd/run/NODENAME"

    cat >"$nd/run/env" <<EOF
export HOME=$(printf '%q' "$nd/home")
export ERL_EPMD_PORT=$(cat -- "$dir/run/EPMD_PORT")
export ERL_CRASH_DUMP=$(printf '%q' "$nd/log/erl_crash.dump")
export RABBITMQ_NODENAME=$(printf '%q' "$nodename")
export RABBITMQ_DIST_PORT=$dist_port
export RABBITMQ_MNESIA_BASE=$(printf '%q' "$nd/mnesia")
export RABBITMQ_LOG_BASE=$(printf '%q' "$nd/log")
export RABBITMQ_PID_FILE=$(printf '%q' "$nd/run/rabbit.pid")
export RABBITMQ_CONFIG_FILE=$(printf '%q' "$nd/rabbitmq.conf")
export RABBITMQ_ADVANCED_CONFIG_FILE=$(printf '%q' "$nd/advanced.config")
export RABBITMQ_CONF_ENV_FILE=$(printf '%q' "$nd/rabbitmq-env.conf")
export RABBITMQ_ENABLED_PLUGINS_FILE=$(printf '%q' "$nd/enabled_plugins")
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
EOF
}

# _cluster_create DIR EXTRA_CONF PORT...
_cluster_create() {
    local IFS=$' \t\n'
    local dir extra=$2 t0 p
    t0=$(date +%s.%N)
    local ports=("${@:3}")
    local count=${#ports[@]}
    for p in "${ports[@]}"; do
        if ! [[ $p =~ ^[0-9]+$ ]] || ((p < 1 || p > 65535)); then
            _cluster_log "invalid port: $p"
            return 2
        fi
    done
    if ((count == 2)) && [[ ${ports[0]} == "${ports[1]}" ]]; then
        _cluster_log "the two ports must differ"
        return 2
    fi
    dir=$(_broker_abs "$1") || { _cluster_log "cannot create $1"; return 1; }
    local ns=${CLUSTER_NETNS:-}
    if [[ -n $ns && ! -e /run/netns/$ns ]]; then
        _cluster_log "network namespace $ns does not exist"
        return 1
    fi

    # refuse to clobber a running cluster
    local n
    for n in 1 2; do
        if cluster_alive "$dir" "$n"; then
            _cluster_log "node $n is already running for $dir"
            return 1
        fi
    done
    if _broker_alive "$(cat -- "$dir/run/EPMD_PID" 2>/dev/null || true)"; then
        _cluster_log "an epmd is already running for $dir"
        return 1
    fi

    rm -rf -- "$dir/run" "$dir/n1" "$dir/n2"
    mkdir -p -- "$dir/run"
    printf '%s\n' "$ns" >"$dir/run/NETNS"
    echo "$count" >"$dir/run/NODES"
    for p in "${ports[@]}"; do
        if _cluster_port_in_use "$dir" "$p"; then
            _cluster_log "port $p is already in use: $(_cluster_in "$dir" ss -Hltnp "sport = :$p" 2>/dev/null | head -n1)"
            return 1
        fi
    done
    "$CLUSTER_PY" -c 'import secrets, string; print("".join(secrets.choice(string.ascii_uppercase) for _ in range(24)))' >"$dir/run/COOKIE"
    chmod 600 -- "$dir/run/COOKIE"

    # --- one private epmd for all nodes ------------------------------------
    local epmd_port epmd_pid="" i nsx=()
    [[ -n $ns ]] && nsx=(ip netns exec "$ns")
    epmd_port=$(_cluster_free_port "$dir") || return 1
    (exec ${nsx[@]+"${nsx[@]}"} setsid -w epmd -port "$epmd_port" -address 127.0.0.1) \
        </dev/null >>"$dir/run/epmd.log" 2>&1 &
    local epmd_launch=$!
    disown "$epmd_launch" 2>/dev/null || true
    echo "$epmd_launch" >"$dir/run/EPMD_LAUNCH_PID"
    for ((i = 0; i < 100; i++)); do
        epmd_pid=$(_cluster_listener_pid "$dir" "$epmd_port")
        [[ -n $epmd_pid ]] && break
        sleep 0.05
    done
    echo "$epmd_port" >"$dir/run/EPMD_PORT"
    if [[ -z $epmd_pid ]]; then
        _cluster_log "epmd did not come up on port $epmd_port"
        _cluster_tail_logs "$dir"
        cluster_stop "$dir" 2>/dev/null
        return 1
    fi
    echo "$epmd_pid" >"$dir/run/EPMD_PID"

    # --- nodes ---------------------------------------------------------------
    local all_ports=("${ports[@]}")
    for ((i = 1; i <= count; i++)); do
        _cluster_write_node "$dir" "$i" "${ports[i - 1]}" "$extra" "${all_ports[@]}" || {
            cluster_stop "$dir" 2>/dev/null
            return 1
        }
        all_ports+=("$(cat -- "$dir/n$i/run/DIST_PORT")")
    done

    local timeout=${CLUSTER_START_TIMEOUT:-120}
    local deadline=$((SECONDS + timeout))
    # Boot all nodes at once (node 2 boots standalone, then joins).
    for ((i = 1; i <= count; i++)); do
        _cluster_launch "$dir" "$i"
    done
    local nodes_list
    nodes_list=$(seq 1 "$count")
    # shellcheck disable=SC2086
    if ! _cluster_wait_up "$dir" "$deadline" $nodes_list; then
        _cluster_tail_logs "$dir"
        cluster_stop "$dir" 2>/dev/null
        return 1
    fi
    local t_boot
    t_boot=$(_cluster_elapsed "$t0")

    if ((count == 2)); then
        local n1name
        n1name=$(cat -- "$dir/n1/run/NODENAME")
        if ! _cluster_ctl_q "$dir" 1 set_policy -p / --apply-to queues --priority 0 vios-ha-all '^' \
            '{"ha-mode":"all","ha-sync-mode":"automatic"}' ||
            ! _cluster_ctl_q "$dir" 2 stop_app ||
            ! _cluster_ctl_q "$dir" 2 join_cluster "$n1name" ||
            ! _cluster_ctl_q "$dir" 2 start_app ||
            ! _cluster_wait_up "$dir" "$deadline" 2 ||
            ! _cluster_wait_member "$dir" "$deadline" 1 2 ||
            ! _cluster_wait_member "$dir" "$deadline" 2 1; then
            _cluster_log "clustering failed (dir $dir)"
            _cluster_tail_logs "$dir"
            cluster_stop "$dir" 2>/dev/null
            return 1
        fi
    fi

    local desc=""
    for ((i = 1; i <= count; i++)); do
        desc+="$(cat -- "$dir/n$i/run/NODENAME") pid $(cat -- "$dir/n$i/run/BEAM_PID") on 127.0.0.1:${ports[i - 1]}, "
    done
    _cluster_log "started ${desc}epmd $epmd_port${ns:+, netns $ns}: nodes up in ${t_boot}s, ready in $(_cluster_elapsed "$t0")s (dir $dir)"
    return 0
}

cluster_start() {
    if (($# < 3 || $# > 4)); then
        _cluster_log "usage: cluster_start DIR PORT1 PORT2 [EXTRA_CONF]"
        return 2
    fi
    _cluster_create "$1" "${4:-}" "$2" "$3"
}

cluster_single_start() {
    if (($# < 2 || $# > 3)); then
        _cluster_log "usage: cluster_single_start DIR PORT [EXTRA_CONF]"
        return 2
    fi
    _cluster_create "$1" "${3:-}" "$2"
}

# _cluster_guard_sid SID -> SID, or nothing if it is our own session /
# process group (never signalled)
_cluster_guard_sid() {
    local sid=$1 my_sid my_pgid
    my_sid=$(ps -o sid= -p $$ 2>/dev/null | tr -dc '0-9' || true)
    my_pgid=$(ps -o pgid= -p $$ 2>/dev/null | tr -dc '0-9' || true)
    if [[ -z $sid || $sid == "$my_sid" || $sid == "$my_pgid" || $sid == 1 ]]; then
        echo ""
    else
        echo "$sid"
    fi
}

# _cluster_node_targets DIR N -> the descendants of node N's VM and launcher
_cluster_node_targets() {
    local nd=$1/n$2 beam launch
    beam=$(cat -- "$nd/run/BEAM_PID" 2>/dev/null || true)
    [[ -z $beam && -f $nd/run/rabbit.pid ]] && beam=$(tr -dc '0-9' <"$nd/run/rabbit.pid" 2>/dev/null || true)
    launch=$(cat -- "$nd/run/LAUNCH_PID" 2>/dev/null || true)
    { _broker_descendants "$beam"; _broker_descendants "$launch"; } | sort -un | tr '\n' ' '
}

_cluster_forget_node() {
    local nd=$1/n$2
    rm -f -- "$nd/run/BEAM_PID" "$nd/run/LAUNCH_PID" "$nd/run/SID" "$nd/run/rabbit.pid" 2>/dev/null || true
}

# _cluster_wait_epmd_forgets DIR N -> wait until epmd no longer lists node N
_cluster_wait_epmd_forgets() {
    local dir=$1 n=$2 short port i
    short=$(cut -d@ -f1 <"$dir/n$n/run/NODENAME" 2>/dev/null) || return 0
    port=$(cat -- "$dir/run/EPMD_PORT" 2>/dev/null) || return 0
    _broker_alive "$(cat -- "$dir/run/EPMD_PID" 2>/dev/null || true)" || return 0
    for ((i = 0; i < 50; i++)); do
        _cluster_in "$dir" epmd -port "$port" -names 2>/dev/null | grep -q "^name $short " || return 0
        sleep 0.1
    done
    return 1
}

cluster_kill() {
    local IFS=$' \t\n'
    local dir=${1:?cluster_kill DIR N} n=${2:?cluster_kill DIR N}
    local nd=$dir/n$n
    [[ -d $nd/run ]] || { _cluster_log "no node $n in $dir"; return 1; }
    local beam launch sid desc p t0
    t0=$(date +%s.%N)
    beam=$(cat -- "$nd/run/BEAM_PID" 2>/dev/null || true)
    launch=$(cat -- "$nd/run/LAUNCH_PID" 2>/dev/null || true)
    sid=$(_cluster_guard_sid "$(cat -- "$nd/run/SID" 2>/dev/null || true)")
    if ! _broker_alive "$beam" && ! _broker_alive "$launch"; then
        _cluster_log "node $n is not running (dir $dir)"
        _cluster_forget_node "$dir" "$n"
        return 1
    fi
    desc=$(_cluster_node_targets "$dir" "$n")
    # The crash: the VM first, then everything around it.
    _broker_alive "$beam" && kill -KILL "$beam" 2>/dev/null || true
    [[ -n $sid ]] && kill -KILL -- "-$sid" 2>/dev/null || true
    for p in $desc $launch; do
        _broker_alive "$p" && kill -KILL "$p" 2>/dev/null || true
    done
    # shellcheck disable=SC2086
    if ! _broker_wait_gone 10 $beam $launch $desc; then
        _cluster_log "node $n: some processes survived SIGKILL"
    fi
    _cluster_forget_node "$dir" "$n"
    _cluster_wait_epmd_forgets "$dir" "$n" || _cluster_log "epmd still lists node $n"
    _cluster_log "killed node $n ($(cat -- "$nd/run/NODENAME") pid $beam, SIGKILL) in $(_cluster_elapsed "$t0")s"
    return 0
}

cluster_restart() {
    local IFS=$' \t\n'
    local dir=${1:?cluster_restart DIR N} n=${2:?cluster_restart DIR N}
    local nd=$dir/n$n t0
    t0=$(date +%s.%N)
    [[ -f $nd/run/env ]] || { _cluster_log "no node $n in $dir"; return 1; }
    if cluster_alive "$dir" "$n" || _broker_alive "$(cat -- "$nd/run/LAUNCH_PID" 2>/dev/null || true)"; then
        _cluster_log "node $n is still running (dir $dir)"
        return 1
    fi
    _broker_alive "$(cat -- "$dir/run/EPMD_PID" 2>/dev/null || true)" || {
        _cluster_log "the cluster's epmd is not running (dir $dir)"
        return 1
    }
    local port
    port=$(cat -- "$nd/run/PORT")
    if _cluster_port_in_use "$dir" "$port"; then
        _cluster_log "port $port is in use"
        return 1
    fi
    _cluster_forget_node "$dir" "$n"
    local timeout=${CLUSTER_START_TIMEOUT:-120}
    local deadline=$((SECONDS + timeout))
    _cluster_launch "$dir" "$n"
    if ! _cluster_wait_up "$dir" "$deadline" "$n"; then
        _cluster_tail_logs "$dir"
        return 1
    fi
    local t_up i viewers=()
    t_up=$(_cluster_elapsed "$t0")
    for ((i = 1; i <= $(_cluster_nodes "$dir"); i++)); do
        ((i != n)) && cluster_alive "$dir" "$i" && viewers+=("$i")
    done
    ((${#viewers[@]} > 0)) || viewers=("$n")
    for i in "${viewers[@]}"; do
        if ! _cluster_wait_member "$dir" "$deadline" "$i" "$n"; then
            _cluster_tail_logs "$dir"
            return 1
        fi
    done
    _cluster_log "restarted node $n ($(cat -- "$nd/run/NODENAME") pid $(cat -- "$nd/run/BEAM_PID") on 127.0.0.1:$port): accepting AMQP after ${t_up}s, back in the cluster after $(_cluster_elapsed "$t0")s"
    return 0
}

cluster_stop() {
    local IFS=$' \t\n'
    local dir=${1:-}
    [[ -n $dir && -d $dir/run ]] || return 0
    local count n nd beam launch sid p
    local -a targets=() desc=() sids=() stopped=()
    count=$(_cluster_nodes "$dir")
    ((count > 0)) || count=2
    for ((n = 1; n <= count; n++)); do
        nd=$dir/n$n
        [[ -d $nd/run ]] || continue
        beam=$(cat -- "$nd/run/BEAM_PID" 2>/dev/null || true)
        [[ -z $beam && -f $nd/run/rabbit.pid ]] && beam=$(tr -dc '0-9' <"$nd/run/rabbit.pid" 2>/dev/null || true)
        launch=$(cat -- "$nd/run/LAUNCH_PID" 2>/dev/null || true)
        sid=$(_cluster_guard_sid "$(cat -- "$nd/run/SID" 2>/dev/null || true)")
        if _broker_alive "$beam" || _broker_alive "$launch" || _broker_group_alive "$sid"; then
            # shellcheck disable=SC2207
            desc+=($(_cluster_node_targets "$dir" "$n"))
            if _broker_alive "$beam"; then
                targets+=("$beam" "$launch")
            else
                # interrupted start: TERM the launcher chain, it forwards TERM
                # shellcheck disable=SC2207
                targets+=("$launch" $(_cluster_node_targets "$dir" "$n"))
            fi
            [[ -n $sid ]] && sids+=("$sid")
            stopped+=("node $n pid ${beam:-?}")
        fi
    done
    if ((${#targets[@]} > 0)); then
        for p in "${targets[@]}"; do
            _broker_alive "$p" && kill -TERM "$p" 2>/dev/null || true
        done
        if ! _broker_wait_gone "${CLUSTER_STOP_TIMEOUT:-20}" "${targets[@]}"; then
            stopped+=("(SIGKILL after ${CLUSTER_STOP_TIMEOUT:-20}s)")
            for p in "${targets[@]}"; do
                _broker_alive "$p" && kill -KILL "$p" 2>/dev/null || true
            done
        fi
        for sid in ${sids[@]+"${sids[@]}"}; do
            if _broker_group_alive "$sid"; then
                kill -TERM -- "-$sid" 2>/dev/null || true
                sleep 0.3
                _broker_group_alive "$sid" && kill -KILL -- "-$sid" 2>/dev/null || true
            fi
        done
        if ((${#desc[@]} > 0)) && ! _broker_wait_gone 3 "${desc[@]}"; then
            for p in "${desc[@]}"; do
                _broker_alive "$p" && kill -KILL "$p" 2>/dev/null || true
            done
        fi
    fi
    for ((n = 1; n <= count; n++)); do
        [[ -d $dir/n$n/run ]] && _cluster_forget_node "$dir" "$n"
    done

    local epmd_pid epmd_launch
    epmd_pid=$(cat -- "$dir/run/EPMD_PID" 2>/dev/null || true)
    epmd_launch=$(cat -- "$dir/run/EPMD_LAUNCH_PID" 2>/dev/null || true)
    for p in "$epmd_pid" "$epmd_launch"; do
        # only if it is still the epmd we started (pid reuse guard)
        if _broker_alive "$p" && [[ $(cat "/proc/$p/comm" 2>/dev/null || true) =~ ^(epmd|setsid|ip)$ ]]; then
            kill -TERM "$p" 2>/dev/null || true
            _broker_wait_gone 5 "$p" || kill -KILL "$p" 2>/dev/null || true
            [[ $p == "$epmd_pid" ]] && stopped+=("epmd pid $p")
        fi
    done
    rm -f -- "$dir/run/EPMD_PID" "$dir/run/EPMD_LAUNCH_PID" 2>/dev/null || true

    if ((${#stopped[@]} > 0)); then
        local msg
        msg=$(printf '%s, ' "${stopped[@]}")
        _cluster_log "stopped ${msg%, } (dir $dir)"
    fi
    return 0
}

cluster_wait_synced() {
    local dir=${1:?cluster_wait_synced DIR [TIMEOUT]} timeout=${2:-60}
    local deadline=$((SECONDS + timeout)) n viewer out alive why=""
    while :; do
        viewer="" alive=0
        for ((n = 1; n <= $(_cluster_nodes "$dir"); n++)); do
            if cluster_alive "$dir" "$n"; then
                alive=$((alive + 1))
                [[ -n $viewer ]] || viewer=$n
            fi
        done
        [[ -n $viewer ]] || { _cluster_log "no node is running (dir $dir)"; return 1; }
        # A queue under our policy is in sync when it has a mirror on every
        # other running node and all of them are synchronised.
        if out=$(cluster_ctl "$dir" "$viewer" list_queues -q -p / --formatter json \
            name policy type exclusive slave_pids synchronised_slave_pids 2>/dev/null) &&
            why=$(printf '%s' "$out" | "$CLUSTER_PY" -c '
import json, sys
want = int(sys.argv[1]) - 1
def n(v):
    return len(v) if isinstance(v, list) else 0
bad = []
for q in json.load(sys.stdin):
    if q.get("policy") != "vios-ha-all" or q.get("type") != "classic" or q.get("exclusive") is True:
        continue
    m, s = n(q.get("slave_pids")), n(q.get("synchronised_slave_pids"))
    if m < want or s < m:
        bad.append("%s (%d/%d mirrors, %d synchronised)" % (q["name"], m, want, s))
if bad:
    print("; ".join(bad))
    sys.exit(1)' "$alive" 2>&1); then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            _cluster_log "queues not synchronised after ${timeout}s: ${why:-no answer from node $viewer} (dir $dir)"
            return 1
        fi
        sleep 0.5
    done
}
