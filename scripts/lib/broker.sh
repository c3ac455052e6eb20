# shellcheck shell=bash
#
# scripts/lib/broker.sh -- throw-away RabbitMQ brokers for vios-bridge tests.
#
# Source this file (it is safe under `set -euo pipefail`) and use:
#
#   broker_start DIR PORT
#       Start a private RabbitMQ node whose whole state (mnesia, logs, pid
#       files, erlang cookie, config) lives under DIR (created if missing).
#         * AMQP 0-9-1 *and* AMQP 1.0 (rabbitmq_amqp1_0 plugin) on
#           127.0.0.1:PORT only; user guest/guest, vhost "/".
#         * node name  vios-test-<cksum of DIR>@localhost
#         * its own epmd on a free loopback port (ERL_EPMD_PORT), so it
#           never touches / depends on a system epmd on 4369;
#         * Erlang distribution on loopback, port PORT+20000 if free,
#           otherwise a free port (RABBITMQ_DIST_PORT).
#       Blocks until the port completes both an AMQP 0-9-1 and an AMQP 1.0
#       (SASL) protocol-header handshake.  Timeout: $BROKER_START_TIMEOUT
#       seconds (default 60); on timeout / early death prints the log tail,
#       stops whatever was started and returns non-zero.
#       Prints one line to stderr on success.
#
#   broker_stop DIR
#       Stop the broker started for DIR (SIGTERM to the beam pid, wait up to
#       $BROKER_STOP_TIMEOUT s (default 30), then SIGKILL to its process
#       group) and the epmd started for it.  Idempotent, never fails, safe
#       to call from an EXIT trap.  Prints one line to stderr if it stopped
#       something.
#
#   broker_ctl DIR ARGS...
#       Run rabbitmqctl against that broker (e.g. `broker_ctl "$d" list_queues`).
#
#   broker_env DIR VAR
#       Print a recorded value: PORT, NODENAME, BEAM_PID, EPMD_PID,
#       EPMD_PORT, DIST_PORT.
#
# Nothing is ever killed by name: only the pids recorded in DIR/run/.
#
# Requires: rabbitmq-server (Debian 12: 3.10.x), erlang, iproute2 (ss),
# util-linux (setsid), /usr/bin/python3 (stdlib only, for the probes).

BROKER_RABBIT_SERVER=${BROKER_RABBIT_SERVER:-/usr/lib/rabbitmq/bin/rabbitmq-server}
BROKER_RABBIT_CTL=${BROKER_RABBIT_CTL:-/usr/lib/rabbitmq/bin/rabbitmqctl}
BROKER_PY=${BROKER_PY:-/usr/bin/python3}

_broker_log() { printf 'broker: %s\n' "$*" >&2; }

# _broker_alive PID -> 0 if PID exists and is not a zombie
_broker_alive() {
    local pid=${1:-}
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    local st
    st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $st != Z && $st != X ]]
}

# _broker_group_alive PGID -> 0 if any process is in that process group
_broker_group_alive() {
    local IFS=$' \t\n'
    local pgid=${1:-}
    [[ $pgid =~ ^[0-9]+$ ]] || return 1
    local p
    for p in $(ps -e -o pid=,pgid=,stat= 2>/dev/null | awk -v g="$pgid" '$2==g && $3 !~ /^Z/ {print $1}'); do
        return 0
    done
    return 1
}

# _broker_descendants PID -> all (transitive) child pids of PID
# (erl_child_setup and inet_gethost call setsid, so the broker's session
# does not cover them).
_broker_descendants() {
    local root=${1:-}
    [[ $root =~ ^[0-9]+$ ]] || return 0
    ps -e -o pid=,ppid= 2>/dev/null | awk -v r="$root" '
        { kids[$2] = kids[$2] " " $1 }
        END {
            n = split(kids[r], q, " ")
            while (n > 0) {
                p = q[n]; n--
                print p
                m = split(kids[p], c, " ")
                for (i = 1; i <= m; i++) q[++n] = c[i]
            }
        }' || true
}

_broker_abs() {
    local d=$1
    mkdir -p -- "$d" || return 1
    (cd -- "$d" && pwd -P)
}

# _broker_port_in_use PORT -> 0 if something listens on PORT (any address)
_broker_port_in_use() {
    local port=$1
    [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]
}

_broker_free_port() {
    "$BROKER_PY" - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

# _broker_listener_pid PORT -> pid of the process listening on PORT
_broker_listener_pid() {
    { ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2; } || true
}

# _broker_probe PORT -> 0 if both AMQP 0-9-1 and AMQP 1.0 handshakes work
_broker_probe() {
    "$BROKER_PY" - "$1" <<'EOF'
import socket, sys
port = int(sys.argv[1])

def exchange(header, n):
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
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
    # AMQP 0-9-1: server must answer with a method frame (connection.start)
    r = exchange(b"AMQP\x00\x00\x09\x01", 1)
    if r[:1] != b"\x01":
        sys.exit(2)
    # AMQP 1.0 SASL layer: plugin echoes the SASL protocol header
    r = exchange(b"AMQP\x03\x01\x00\x00", 8)
    if r != b"AMQP\x03\x01\x00\x00":
        sys.exit(3)
except OSError:
    sys.exit(1)
sys.exit(0)
EOF
}

_broker_tail_logs() {
    local dir=$1 f
    for f in "$dir"/log/console.log "$dir"/log/*@localhost.log "$dir"/log/epmd.log; do
        [[ -s $f ]] || continue
        printf -- '---- tail %s ----\n' "$f" >&2
        tail -n 40 -- "$f" >&2 || true
    done
}

broker_env() {
    local dir=${1:?broker_env DIR VAR} var=${2:?broker_env DIR VAR}
    local f="$dir/run/$var"
    [[ -f $f ]] || return 1
    cat -- "$f"
}

broker_start() {
    local IFS=$' \t\n'
    if (($# != 2)); then
        _broker_log "usage: broker_start DIR PORT"
        return 2
    fi
    local dir port
    port=$2
    if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
        _broker_log "invalid port: $port"
        return 2
    fi
    dir=$(_broker_abs "$1") || { _broker_log "cannot create $1"; return 1; }

    local t0
    t0=$(date +%s.%N)

    if [[ -f $dir/run/BEAM_PID ]] && _broker_alive "$(cat -- "$dir/run/BEAM_PID")"; then
        _broker_log "a broker is already running for $dir (pid $(cat -- "$dir/run/BEAM_PID"))"
        return 1
    fi
    if _broker_port_in_use "$port"; then
        _broker_log "port $port is already in use: $(ss -Hltnp "sport = :$port" 2>/dev/null | head -n1)"
        return 1
    fi

    mkdir -p -- "$dir/mnesia" "$dir/log" "$dir/run" "$dir/home" || return 1
    chmod 700 -- "$dir/home" || true
    rm -f -- "$dir"/run/* || true

    local nodename
    nodename="vios-test-$(printf '%s' "$dir" | cksum | cut -d' ' -f1)@localhost"

    local dist_port=$((port + 20000))
    if ((dist_port > 65535)) || _broker_port_in_use "$dist_port"; then
        dist_port=$(_broker_free_port) || return 1
    fi

    # --- private epmd ------------------------------------------------------
    local epmd_port epmd_pid="" i
    epmd_port=$(_broker_free_port) || return 1
    # setsid -w: if setsid has to fork (caller has job control, so the
    # background job is a process-group leader) the launcher still lives
    # exactly as long as the program.
    setsid -w epmd -port "$epmd_port" -address 127.0.0.1 \
        </dev/null >>"$dir/log/epmd.log" 2>&1 &
    local epmd_launch=$!
    disown "$epmd_launch" 2>/dev/null || true   # no job notices under set -m
    for ((i = 0; i < 100; i++)); do
        epmd_pid=$(_broker_listener_pid "$epmd_port")
        [[ -n $epmd_pid ]] && break
        sleep 0.05
    done
    if [[ -z $epmd_pid ]]; then
        local p
        for p in $(_broker_descendants "$epmd_launch") "$epmd_launch"; do
            _broker_alive "$p" && kill -TERM "$p" 2>/dev/null || true
        done
        _broker_log "epmd did not come up on port $epmd_port"
        _broker_tail_logs "$dir"
        return 1
    fi
    echo "$epmd_pid" >"$dir/run/EPMD_PID"
    echo "$epmd_port" >"$dir/run/EPMD_PORT"

    # --- config --------------------------------------------------------------
    printf '[rabbitmq_amqp1_0].\n' >"$dir/enabled_plugins"
    : >"$dir/rabbitmq-env.conf"   # shadow /etc/rabbitmq/rabbitmq-env.conf
    cat >"$dir/rabbitmq.conf" <<EOF
# generated by scripts/lib/broker.sh -- test broker, loopback only
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

    echo "$port" >"$dir/run/PORT"
    echo "$dist_port" >"$dir/run/DIST_PORT"
    echo "$nodename" >"$dir/run/NODENAME"

    # Environment shared by server and broker_ctl.
    cat >"$dir/run/env" <<EOF
export HOME=$(printf '%q' "$dir/home")
export ERL_EPMD_PORT=$epmd_port
export ERL_CRASH_DUMP=$(printf '%q' "$dir/log/erl_crash.dump")
export RABBITMQ_NODENAME=$(printf '%q' "$nodename")
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$port
export RABBITMQ_DIST_PORT=$dist_port
export RABBITMQ_MNESIA_BASE=$(printf '%q' "$dir/mnesia")
export RABBITMQ_LOG_BASE=$(printf '%q' "$dir/log")
export RABBITMQ_PID_FILE=$(printf '%q' "$dir/run/rabbit.pid")
export RABBITMQ_CONFIG_FILE=$(printf '%q' "$dir/rabbitmq.conf")
export RABBITMQ_ADVANCED_CONFIG_FILE=$(printf '%q' "$dir/advanced.config")
export RABBITMQ_CONF_ENV_FILE=$(printf '%q' "$dir/rabbitmq-env.conf")
export RABBITMQ_ENABLED_PLUGINS_FILE=$(printf '%q' "$dir/enabled_plugins")
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
EOF

    # --- rabbit ----------------------------------------------------------------
    (
        set +eu
        # shellcheck disable=SC1091
        . "$dir/run/env"
        cd -- "$dir" || exit 1
        exec setsid -w "$BROKER_RABBIT_SERVER"
    ) </dev/null >>"$dir/log/console.log" 2>&1 &
    local launch_pid=$!
    disown "$launch_pid" 2>/dev/null || true
    echo "$launch_pid" >"$dir/run/LAUNCH_PID"

    local timeout=${BROKER_START_TIMEOUT:-60}
    local deadline=$((SECONDS + timeout))
    local beam_pid="" ok=0
    while ((SECONDS < deadline)); do
        if [[ -z $beam_pid && -s $dir/run/rabbit.pid ]]; then
            beam_pid=$(tr -dc '0-9' <"$dir/run/rabbit.pid")
            if [[ -n $beam_pid ]]; then
                echo "$beam_pid" >"$dir/run/BEAM_PID"
                ps -o sid= -p "$beam_pid" 2>/dev/null | tr -dc '0-9' >"$dir/run/SID" || true
            fi
        fi
        if [[ -n $beam_pid ]]; then
            _broker_alive "$beam_pid" || break
        elif ! _broker_alive "$launch_pid"; then
            # launcher died before the VM wrote its pid file
            break
        fi
        if [[ -n $beam_pid ]] && _broker_probe "$port"; then
            ok=1
            break
        fi
        sleep 0.2
    done

    if ((ok != 1)); then
        if ((SECONDS >= deadline)); then
            _broker_log "broker on port $port not ready after ${timeout}s (dir $dir)"
        else
            _broker_log "broker on port $port died during startup (dir $dir)"
        fi
        _broker_tail_logs "$dir"
        broker_stop "$dir" 2>/dev/null || true
        return 1
    fi

    local t1
    t1=$(date +%s.%N)
    _broker_log "$(printf 'started %s pid %s on 127.0.0.1:%s (amqp 0-9-1 + 1.0, epmd %s pid %s) in %.1fs, dir %s' \
        "$nodename" "$beam_pid" "$port" "$epmd_port" "$epmd_pid" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" "$dir")"
    return 0
}

# _broker_wait_gone TIMEOUT PID... -> 0 when all PIDs are gone
_broker_wait_gone() {
    local IFS=$' \t\n'
    local timeout=$1
    shift
    local deadline=$((SECONDS + timeout)) p any
    while :; do
        any=0
        for p in "$@"; do
            _broker_alive "$p" && any=1
        done
        ((any == 0)) && return 0
        ((SECONDS >= deadline)) && return 1
        sleep 0.1
    done
}

broker_stop() {
    local IFS=$' \t\n'
    local dir=${1:-}
    [[ -n $dir && -d $dir/run ]] || return 0
    local beam_pid="" launch_pid="" sid="" epmd_pid="" epmd_port="" port=""
    beam_pid=$(cat -- "$dir/run/BEAM_PID" 2>/dev/null || true)
    if [[ -z $beam_pid ]]; then
        # stopped before broker_start recorded it (e.g. interrupted start)
        [[ -f $dir/run/rabbit.pid ]] && beam_pid=$(tr -dc '0-9' <"$dir/run/rabbit.pid" 2>/dev/null || true)
    fi
    launch_pid=$(cat -- "$dir/run/LAUNCH_PID" 2>/dev/null || true)
    sid=$(cat -- "$dir/run/SID" 2>/dev/null || true)
    epmd_pid=$(cat -- "$dir/run/EPMD_PID" 2>/dev/null || true)
    epmd_port=$(cat -- "$dir/run/EPMD_PORT" 2>/dev/null || true)
    port=$(cat -- "$dir/run/PORT" 2>/dev/null || true)
    local timeout=${BROKER_STOP_TIMEOUT:-30}
    local stopped=() how="TERM"

    # Never signal our own session / process group.
    local my_sid my_pgid
    my_sid=$(ps -o sid= -p $$ 2>/dev/null | tr -dc '0-9' || true)
    my_pgid=$(ps -o pgid= -p $$ 2>/dev/null | tr -dc '0-9' || true)
    if [[ -n $sid && ($sid == "$my_sid" || $sid == "$my_pgid" || $sid == 1) ]]; then
        sid=""
    fi

    if _broker_alive "$beam_pid" || _broker_alive "$launch_pid" || _broker_group_alive "$sid"; then
        local desc targets p
        # Everything below the launcher and the VM, collected before
        # signalling (erl_child_setup / inet_gethost setsid() themselves, so
        # the session kill below does not reach them).
        desc=$({ _broker_descendants "$launch_pid"; _broker_descendants "$beam_pid"; } | sort -un)
        if _broker_alive "$beam_pid"; then
            targets="$beam_pid $launch_pid"
        else
            # VM pid not known yet (interrupted start): TERM the launcher
            # chain; the rabbitmq-server script forwards TERM to the VM.
            targets="$launch_pid $desc"
        fi
        # Graceful: RabbitMQ shuts down cleanly on SIGTERM.
        for p in $targets; do
            _broker_alive "$p" && kill -TERM "$p" 2>/dev/null || true
        done
        # shellcheck disable=SC2086
        if ! _broker_wait_gone "$timeout" $targets; then
            how="KILL"
            for p in $targets; do
                _broker_alive "$p" && kill -KILL "$p" 2>/dev/null || true
            done
        fi
        # Leftovers in the broker's session.
        if _broker_group_alive "$sid"; then
            kill -TERM -- "-$sid" 2>/dev/null || true
            sleep 0.3
            _broker_group_alive "$sid" && kill -KILL -- "-$sid" 2>/dev/null || true
        fi
        # Helpers normally exit together with the VM.
        # shellcheck disable=SC2086
        if [[ -n $desc ]] && ! _broker_wait_gone 3 $desc; then
            for p in $desc; do
                _broker_alive "$p" && kill -KILL "$p" 2>/dev/null || true
            done
        fi
        stopped+=("rabbit pid ${beam_pid:-?} ($how)")
    fi

    if _broker_alive "$epmd_pid"; then
        # only if it is still the epmd we started (pid reuse guard)
        if [[ $(cat "/proc/$epmd_pid/comm" 2>/dev/null || true) == epmd ]]; then
            kill -TERM "$epmd_pid" 2>/dev/null || true
            _broker_wait_gone 5 "$epmd_pid" || kill -KILL "$epmd_pid" 2>/dev/null || true
            stopped+=("epmd pid $epmd_pid")
        fi
    fi

    rm -f -- "$dir/run/BEAM_PID" "$dir/run/LAUNCH_PID" "$dir/run/SID" \
        "$dir/run/EPMD_PID" "$dir/run/rabbit.pid" 2>/dev/null || true

    if ((${#stopped[@]} > 0)); then
        local msg
        msg=$(printf '%s, ' "${stopped[@]}")
        _broker_log "stopped broker on port ${port:-?}: ${msg%, } (dir $dir)"
    fi
    return 0
}

broker_ctl() {
    local dir=${1:?broker_ctl DIR ARGS...}
    shift
    [[ -f $dir/run/env ]] || { _broker_log "no broker env in $dir"; return 1; }
    (
        set +eu
        # shellcheck disable=SC1091
        . "$dir/run/env"
        exec "$BROKER_RABBIT_CTL" -n "$RABBITMQ_NODENAME" "$@"
    )
}
