#!/usr/bin/env bash
# Start, inspect and stop an N-node local cluster of real agents on loopback.
#
#   deploy/local-cluster.sh start [N]   # N in 1..16 (default 3)
#   deploy/local-cluster.sh status
#   deploy/local-cluster.sh stop [--network]   # --network: also remove the VM network
#
# Node i: management 127.0.1.i:7001, Raft 127.0.1.i:7002, migration 127.0.2.i:7003,
# Prometheus metrics http://127.0.1.i:7004/metrics, web console https://127.0.1.i:7005
# (`clusterctl console url` prints a login link); data, logs and pid files under
# .local-cluster/; the shared volume "vol" (every node sees the same directory, standing in
# for shared storage) is .local-cluster/volumes/vol. Binaries are built first with the
# `fast` profile (optimised, no debug info: an idle agent costs a fraction of a debug
# one's CPU) into target/fast/; PROFILE=debug runs the debug build (target/debug/) instead.
#
# Every listener speaks mutual TLS, migrations included. The first start creates the
# cluster CA in .local-cluster/pki (node 1 also holds its key, so it may issue
# certificates), node 1's certificate, an admin client certificate; every other node gets
# its certificate with a one-time join token from node 1; and a clusterctl context
# "local" in ~/.config/clusterctl/config.toml (or $CLUSTERCTL_CONFIG), made current:
# plain `clusterctl cluster status` then just works.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.local-cluster"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
PROFILE="${PROFILE:-fast}"
[[ "$PROFILE" == fast || "$PROFILE" == debug ]] || { echo "local-cluster: PROFILE must be fast or debug, got '$PROFILE'" >&2; exit 2; }
BIN="$TARGET/$PROFILE"
AGENT="$BIN/cluster-agent"
CTL="$BIN/clusterctl"

die() { echo "local-cluster: $*" >&2; exit 1; }

build() {
    "$ROOT/deploy/setup.sh" >/dev/null
    local flag=(--profile "$PROFILE")
    [[ "$PROFILE" == debug ]] && flag=()
    [[ -x "$AGENT" && -x "$CTL" ]] ||
        echo "local-cluster: building cluster-agent and clusterctl ($PROFILE profile; the first build compiles RocksDB, ~10-15 min)"
    (cd "$ROOT" && cargo build -q "${flag[@]}" -p cluster-agent -p ctl)
}

running() { # id -> exit 0 if running
    local pidf="$STATE/node-$1.pid"
    [[ -f "$pidf" ]] && kill -0 "$(cat "$pidf")" 2>/dev/null
}

PKI="$STATE/pki"
ctl() {
    "$CTL" --endpoint "127.0.1.$1:7001" --ca "$PKI/ca/ca.pem" \
        --cert "$PKI/admin/cert.pem" --key "$PKI/admin/key.pem" "${@:2}"
}

# The CA, the admin's certificate and the clusterctl context (once).
pki() {
    if [[ ! -f "$PKI/ca/ca.pem" ]]; then
        "$CTL" pki create-ca --dir "$PKI/ca" --cluster-name local >/dev/null
        "$CTL" pki issue-user --ca-dir "$PKI/ca" --name admin --role admin --out "$PKI/admin" >/dev/null
        echo "created the cluster CA and an admin certificate in $PKI"
    fi
    local eps="127.0.1.1:7001"
    for i in $(seq 2 "$1"); do eps+=",127.0.1.$i:7001"; done
    "$CTL" config add-context local --endpoints "$eps" --ca "$PKI/ca/ca.pem" \
        --cert "$PKI/admin/cert.pem" --key "$PKI/admin/key.pem" --current >/dev/null
}

# Node i's certificate (once): its identity and the addresses it serves on. Node 1 gets
# it from the CA directly (and the CA key: it issues the others); every other node joins
# as a new host would: a one-time join token from node 1, its key made here.
node_cert() {
    local i="$1"
    [[ -f "$STATE/node-$i-tls/cert.pem" ]] && return 0
    if (( i == 1 )); then
        "$CTL" pki issue-node --ca-dir "$PKI/ca" --node-id 1 --ip 127.0.1.1 --ip 127.0.2.1 \
            --out "$STATE/node-1-tls" --issuer >/dev/null
    else
        local token
        token="$(ctl 1 cluster token create --ttl 10m)"
        "$CTL" pki join --endpoint 127.0.1.1:7001 --ca "$PKI/ca/ca.pem" --token "$token" \
            --node-id "$i" --ip "127.0.1.$i" --ip "127.0.2.$i" --out "$STATE/node-$i-tls" >/dev/null
    fi
}

# The VM network "vmnet" (when run as root with iproute2): bridge $VMNET_BRIDGE in this
# namespace with no address (IPv6 link-local generation off too), and a namespace
# $VMNET_NS standing in for the hosts on that network, linked to the bridge by a veth pair,
# its end at $VMNET_CLIENT. Every address stays inside that namespace. Agents attach each
# VM NIC's TAP to the bridge; reach a VM from the namespace:
#   ip netns exec local-vmnet ping 10.99.0.10
VMNET_BRIDGE=lcbr0
VMNET_NS=local-vmnet
VMNET_CLIENT=10.99.0.1/24
vmnet() {
    VMNET_TOML=""
    if [[ $(id -u) -ne 0 ]] || ! command -v ip >/dev/null; then
        echo "local-cluster: no VM network (needs root and iproute2); VMs without NICs only"
        return 0
    fi
    if [[ ! -d /sys/class/net/$VMNET_BRIDGE ]]; then
        ip link add "$VMNET_BRIDGE" type bridge
        ip link set dev "$VMNET_BRIDGE" addrgenmode none
        ip link set dev "$VMNET_BRIDGE" up
    fi
    if ! ip netns list | grep -qw "$VMNET_NS"; then
        ip netns add "$VMNET_NS"
        ip -n "$VMNET_NS" link set lo up
    fi
    if [[ ! -d /sys/class/net/lcveth0 ]]; then
        ip link add lcveth0 type veth peer name eth0 netns "$VMNET_NS"
        ip link set dev lcveth0 addrgenmode none
        ip link set dev lcveth0 master "$VMNET_BRIDGE" up
        ip -n "$VMNET_NS" addr add "$VMNET_CLIENT" dev eth0
        ip -n "$VMNET_NS" link set eth0 up
    fi
    VMNET_TOML=$'\n[[networks]]\nname = "vmnet"\nbridge = "'"$VMNET_BRIDGE"$'"\n'
}

# Removes the VM network (`stop --network`).
vmnet_remove() {
    ip link del lcveth0 2>/dev/null || true
    ip netns del "$VMNET_NS" 2>/dev/null || true
    ip link del "$VMNET_BRIDGE" 2>/dev/null || true
    echo "local-cluster: VM network removed (bridge $VMNET_BRIDGE, namespace $VMNET_NS)"
}

wait_ready() { # id
    for _ in $(seq 1 100); do
        ctl "$1" health >/dev/null 2>&1 && return 0   # grpc.health.v1
        running "$1" || die "node $1 exited; see $STATE/node-$1.log: $(tail -n 3 "$STATE/node-$1.log")"
        sleep 0.1
    done
    die "node $1 did not answer on 127.0.1.$1:7001 within 10 s; see $STATE/node-$1.log"
}

start() {
    local n="${1:-3}"
    [[ "$n" =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 16 )) || die "N must be a number from 1 to 16, got '$n'"
    build
    mkdir -p "$STATE" "$STATE/volumes/vol"
    pki "$n"
    vmnet
    local fresh=1
    [[ -d "$STATE/node-1" ]] && fresh=0
    for i in $(seq 1 "$n"); do
        running "$i" && { echo "node $i already running"; continue; }
        node_cert "$i"
        cat > "$STATE/node-$i.toml" <<TOML
node_id = $i
name = "node-$i"
data_dir = "$STATE/node-$i"
tls_dir = "$STATE/node-$i-tls"
mgmt_addr = "127.0.1.$i:7001"
raft_addr = "127.0.1.$i:7002"
migration_addr = "127.0.2.$i:7003"
mgmt_subnet = "127.0.1.0/24"
migration_subnet = "127.0.2.0/24"
metrics_addr = "127.0.1.$i:7004"
console_addr = "127.0.1.$i:7005"

[[volumes]]
name = "vol"
path = "$STATE/volumes/vol"
$VMNET_TOML
TOML
        local was_new=1
        [[ -d "$STATE/node-$i" ]] && was_new=0
        "$AGENT" --config "$STATE/node-$i.toml" >>"$STATE/node-$i.log" 2>&1 &
        echo $! > "$STATE/node-$i.pid"
        wait_ready "$i"
        if (( i == 1 && fresh == 1 )); then
            ctl 1 cluster init --name local >/dev/null
            echo "node 1 started, cluster initialized"
        elif (( was_new == 1 )); then
            ctl "$i" cluster join --via 127.0.1.1:7001 >/dev/null
            echo "node $i started, joined"
        else
            echo "node $i restarted from its data dir"
        fi
    done
    echo
    ctl 1 node list || true
    echo
    echo "clusterctl context \"local\" is current (endpoints, CA and admin certificate): e.g. $CTL cluster status"
    echo "web console: https://127.0.1.1:7005 (log in with the link \`$CTL console url\` prints; CA: $PKI/ca.pem)"
    if [[ -n "$VMNET_TOML" ]]; then
        echo "VM network \"vmnet\": bridge $VMNET_BRIDGE; its hosts' side is namespace $VMNET_NS ($VMNET_CLIENT), e.g."
        echo "  $CTL vm create web --workload net --net-ip 10.99.0.10 --nic vmnet && ip netns exec $VMNET_NS ping -c 3 10.99.0.10"
    fi
}

stop() {
    [[ -d "$STATE" ]] || { echo "local-cluster: nothing to stop"; return 0; }
    local pids=() ids=()
    for pidf in "$STATE"/node-*.pid; do
        [[ -f "$pidf" ]] || continue
        local id="${pidf##*/node-}"; id="${id%.pid}"
        if running "$id"; then
            kill -TERM "$(cat "$pidf")"
            pids+=("$(cat "$pidf")"); ids+=("$id")
        fi
    done
    local stopped=0 forced=0
    for k in "${!pids[@]}"; do
        local p="${pids[$k]}"
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$p" 2>/dev/null; then
            kill -KILL "$p"; forced=$((forced + 1))
            echo "node ${ids[$k]} did not stop within 10 s; killed"
        else
            stopped=$((stopped + 1))
        fi
        rm -f "$STATE/node-${ids[$k]}.pid"
    done
    echo "local-cluster: stopped $stopped agent(s) cleanly, $forced forced; data kept in $STATE (rm -rf it to start over)"
    local workers
    workers=$(pgrep -fc "vm-worker --dir $STATE/" || true)
    if (( workers > 0 )); then
        echo "local-cluster: $workers VM worker(s) keep running: \`$0 start\` within the announced restart window (60 s) adopts them; after it they stop their VMs"
    fi
}

status() {
    [[ -d "$STATE" ]] || { echo "local-cluster: not started"; return 0; }
    for pidf in "$STATE"/node-*.pid; do
        [[ -f "$pidf" ]] || continue
        local id="${pidf##*/node-}"; id="${id%.pid}"
        if running "$id"; then echo "node $id: running (pid $(cat "$pidf"))"; else echo "node $id: not running"; fi
    done
    [[ -x "$CTL" ]] && { echo; ctl 1 cluster status || true; }
}

case "${1:-}" in
    start) start "${2:-3}" ;;
    stop) stop; [[ "${2:-}" == "--network" ]] && vmnet_remove; true ;;
    status) status ;;
    *) echo "usage: $0 start [N]|stop [--network]|status" >&2; exit 2 ;;
esac
