#!/usr/bin/env bash
# scripts/lib/selftest-brokers.sh -- proves that the broker harnesses in
# scripts/lib work on this machine (root, RabbitMQ 3.10, no systemd):
#
#   1. cluster.sh: start a two-node cluster, publish confirmed messages to a
#      mirrored queue through node 1, SIGKILL node 1, consume every message
#      through node 2 (failover), restart node 1 and check that it is back in
#      the cluster with a synchronised mirror.
#   2. netns.sh (+ cluster_single_start): inside a fresh network namespace, a
#      broker listening on 127.0.0.1 and 198.18.0.1: guest/guest is refused on
#      198.18.0.1 (loopback_users) and accepted on 127.0.0.1; another user is
#      accepted on 198.18.0.1; `rabbitmqctl list_connections peer_host
#      peer_port` shows both connections.
#
# Prints the timings.  Takes well under a minute; needs `scripts/deps` first.
#
#   scripts/lib/selftest-brokers.sh
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=cluster.sh
source "$here/cluster.sh"
# shellcheck source=netns.sh
source "$here/netns.sh"

PY=/usr/bin/python3
AMQP=$here/cluster_amqp.py

say() { printf '\n== %s\n' "$*" >&2; }
fail() {
    printf 'selftest-brokers: FAIL: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

[[ $(id -u) == 0 ]] || fail "needs root (ip netns)"
[[ -x $BROKER_RABBIT_SERVER ]] || fail "rabbitmq-server missing: run scripts/deps"
"$PY" -c 'import pika' 2>/dev/null || fail "python3-pika missing for $PY: run scripts/deps"

t_all=$(now)
work=$(mktemp -d /tmp/vios-selftest-brokers.XXXXXX)
ns=""
hold_pids=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in ${hold_pids[@]+"${hold_pids[@]}"}; do
        kill "$p" 2>/dev/null || true
    done
    cluster_stop "$work/cluster"
    cluster_stop "$work/nsbroker"
    [[ -n $ns ]] && netns_delete "$ns"
    if ((rc == 0 || rc == 130 || rc == 143)); then
        rm -rf -- "$work"
    else
        echo "selftest-brokers: state kept in $work" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------------------
say "two-node cluster"
d=$work/cluster
p1=$(free_port)
p2=$(free_port)
while [[ $p2 == "$p1" ]]; do p2=$(free_port); done
t=$(now)
cluster_start "$d" "$p1" "$p2"
t_cluster_start=$(since "$t")
n1=$(cluster_env "$d" 1 NODENAME)
n2=$(cluster_env "$d" 2 NODENAME)
for v in 1 2; do
    running=$(cluster_running "$d" "$v")
    { grep -qxF "$n1" <<<"$running" && grep -qxF "$n2" <<<"$running"; } ||
        fail "node $v does not list both nodes as running: $running"
done
echo "running nodes: $(cluster_running "$d" 1 | tr '\n' ' ')"
cluster_ctl "$d" 1 list_policies -q -p /

say "publish through node 1 (127.0.0.1:$p1), kill node 1, consume through node 2 (127.0.0.1:$p2)"
count=500
"$PY" "$AMQP" publish --port "$p1" --queue selftest-failover --count "$count"
cluster_wait_synced "$d" 30 || fail "mirror not synchronised before the kill"
cluster_ctl "$d" 2 list_queues -q name messages pid slave_pids synchronised_slave_pids
t=$(now)
cluster_kill "$d" 1
"$PY" "$AMQP" consume --port "$p2" --queue selftest-failover --count "$count" --timeout 30 ||
    fail "failover: messages not consumable through node 2"
t_failover=$(since "$t")
cluster_alive "$d" 1 && fail "node 1 still alive after cluster_kill"
running=$(cluster_running "$d" 2)
grep -qxF "$n1" <<<"$running" && fail "node 2 still lists node 1 as running"
echo "node 2 sees running: ${running//$'\n'/ }"

say "restart node 1"
t=$(now)
cluster_restart "$d" 1
t_restart=$(since "$t")
for v in 1 2; do
    running=$(cluster_running "$d" "$v")
    { grep -qxF "$n1" <<<"$running" && grep -qxF "$n2" <<<"$running"; } ||
        fail "after restart, node $v does not list both nodes as running: $running"
done
echo "running nodes: $(cluster_running "$d" 2 | tr '\n' ' ')"
t=$(now)
cluster_wait_synced "$d" 30 || fail "queue not mirrored to the restarted node"
t_resync=$(since "$t")
cluster_ctl "$d" 1 list_queues -q name messages pid slave_pids synchronised_slave_pids
# node 1 serves clients again
"$PY" "$AMQP" publish --port "$p1" --queue selftest-failover --count 10
"$PY" "$AMQP" consume --port "$p1" --queue selftest-failover --count 10 --timeout 10 ||
    fail "restarted node 1 does not serve the queue"
t=$(now)
cluster_stop "$d"
t_cluster_stop=$(since "$t")
cluster_alive "$d" 1 && fail "node 1 survived cluster_stop"
cluster_alive "$d" 2 && fail "node 2 survived cluster_stop"
cluster_stop "$d" # idempotent

# ---------------------------------------------------------------------------
say "broker in a network namespace, listening on 127.0.0.1 and 198.18.0.1"
ns=$(netns_name vios-selftest)
netns_create "$ns" 198.18.0.1/32
extra=$(netns_addr "$ns")
[[ $extra == 198.18.0.1 ]] || fail "unexpected addresses on lo in $ns: $extra"
nd=$work/nsbroker
port=5672 # the namespace has a port space of its own
t=$(now)
CLUSTER_NETNS=$ns cluster_single_start "$nd" "$port" "listeners.tcp.2 = 198.18.0.1:@PORT@"
t_ns_start=$(since "$t")
netns_exec "$ns" ss -Hltn "sport = :$port"
[[ -z $(ss -Hltn "sport = :$port" | grep -F 198.18.0.1 || true) ]] ||
    fail "198.18.0.1 listener visible outside the namespace"
cluster_ctl "$nd" 1 add_user vios vios-secret >/dev/null
cluster_ctl "$nd" 1 set_permissions -p / vios '.*' '.*' '.*' >/dev/null

rc=0
netns_exec "$ns" "$PY" "$AMQP" login --host 198.18.0.1 --port "$port" || rc=$?
((rc == 3)) || fail "guest/guest over 198.18.0.1 was not refused (rc $rc)"
# the broker's log handler writes asynchronously
for ((k = 0; k < 50; k++)); do
    grep -qh "can only connect via localhost" "$nd"/n1/log/*@localhost.log && break
    sleep 0.1
done
grep -h "can only connect via localhost" "$nd"/n1/log/*@localhost.log | tail -n1 ||
    fail "no loopback_users refusal in the broker log"
netns_exec "$ns" "$PY" "$AMQP" login --host 127.0.0.1 --port "$port" ||
    fail "guest/guest over 127.0.0.1 was refused"
netns_exec "$ns" "$PY" "$AMQP" login --host 198.18.0.1 --port "$port" --user vios --password vios-secret ||
    fail "vios over 198.18.0.1 was refused"

say "rabbitmqctl list_connections peer_host peer_port (two held connections)"
holds=("127.0.0.1 guest guest" "198.18.0.1 vios vios-secret")
fds=()
for i in 0 1; do
    read -r host user pass <<<"${holds[i]}"
    mkfifo "$work/hold$i.in"
    netns_exec "$ns" "$PY" "$AMQP" hold --host "$host" --port "$port" --user "$user" --password "$pass" \
        <"$work/hold$i.in" >"$work/hold$i.out" 2>&1 &
    hold_pids+=($!)
    exec {fd}>"$work/hold$i.in"
    fds+=("$fd")
done
for i in 0 1; do
    for ((k = 0; k < 150; k++)); do
        grep -q '^connected' "$work/hold$i.out" 2>/dev/null && break
        kill -0 "${hold_pids[i]}" 2>/dev/null || break
        sleep 0.1
    done
    grep '^connected' "$work/hold$i.out" || { cat "$work/hold$i.out" >&2; fail "hold $i did not connect"; }
done
conns=$(cluster_ctl "$nd" 1 list_connections -q user peer_host peer_port host port)
printf '%s\n' "$conns"
for i in 0 1; do
    # "connected LADDR:LPORT -> ..." : the broker's peer is our local end
    read -r _ local _ <"$work/hold$i.out"
    lhost=${local%:*}
    lport=${local##*:}
    awk -v h="$lhost" -v p="$lport" '$2 == h && $3 == p { found = 1 } END { exit !found }' <<<"$conns" ||
        fail "list_connections does not show peer $lhost:$lport"
done
for fd in "${fds[@]}"; do
    exec {fd}>&-
done
for p in "${hold_pids[@]}"; do
    wait "$p" || fail "hold client exited with an error"
done
hold_pids=()

t=$(now)
cluster_stop "$nd"
netns_delete "$ns"
t_ns_stop=$(since "$t")
[[ -e /run/netns/$ns ]] && fail "namespace $ns still exists"
ns=""

say "timings"
cat <<EOF
cluster start (2 nodes booted in parallel, join, policy, ready): ${t_cluster_start}s
failover (SIGKILL node 1 -> all $count messages consumed via node 2): ${t_failover}s
node 1 restart (SIGKILLed -> accepting AMQP and listed as running by node 2): ${t_restart}s
mirror re-synchronised after restart: ${t_resync}s
cluster stop (SIGTERM both, epmd): ${t_cluster_stop}s
namespace broker start: ${t_ns_start}s, stop + namespace delete: ${t_ns_stop}s
total: $(since "$t_all")s
EOF
echo "selftest-brokers: OK"
