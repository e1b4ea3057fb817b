#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, apart from its own broker on 5672: nodes
# imagegen1..3@localhost on AMQP ports 5681-5683 (distribution ports 25681-25683), each with its own
# data and log directories under $IMAGEGEN_CLUSTER_DIR (/tmp/imagegen-cluster), one Erlang cookie,
# no plugins, and Erlang's busy-waiting off (+sbwt none) so that three nodes fit on two cores.
#
# Usage: scripts/cluster.sh start        start the three nodes and join them into one cluster
#        scripts/cluster.sh stop         stop them (their data is kept until the next start)
#        scripts/cluster.sh stop-node N  stop node N (1-3) cleanly
#        scripts/cluster.sh kill-node N  kill -9 node N's VM
#        scripts/cluster.sh start-node N start node N again (it rejoins the cluster)
#        scripts/cluster.sh leader Q     the node (1-3) that leads quorum queue Q
#        scripts/cluster.sh urls         the AMQP URLs of the three nodes, comma-separated
#        scripts/cluster.sh connections  the cluster's client connections, one a line: the node's AMQP
#                                        port, then the client's properties (its name among them)
set -euo pipefail

BASE=${IMAGEGEN_CLUSTER_DIR:-/tmp/imagegen-cluster}
BIN=/usr/lib/rabbitmq/bin
[ -x "$BIN/rabbitmq-server" ] || BIN=$(dirname "$(command -v rabbitmq-server)")
export HOME=$BASE
export ERL_EPMD_ADDRESS=127.0.0.1

log() { echo "cluster: $*" >&2; }
die() { log "$*"; exit 1; }

port() { echo $((5680 + $1)); }
name() { echo "imagegen$1@localhost"; }

node_env() {
    local i=$1 dir=$BASE/n$1
    mkdir -p "$dir/mnesia" "$dir/log"
    printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users = none\n' "$(port "$i")" >"$dir/rabbitmq.conf"
    : >"$dir/env.conf"
    export RABBITMQ_NODENAME=$(name "$i")
    export RABBITMQ_NODE_PORT=$(port "$i")
    export RABBITMQ_DIST_PORT=$((20000 + $(port "$i")))
    export RABBITMQ_MNESIA_BASE=$dir/mnesia
    export RABBITMQ_LOG_BASE=$dir/log
    export RABBITMQ_PID_FILE=$dir/pid
    export RABBITMQ_CONFIG_FILE=$dir/rabbitmq
    export RABBITMQ_CONF_ENV_FILE=$dir/env.conf
    export RABBITMQ_ENABLED_PLUGINS_FILE=$BASE/enabled_plugins
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none -kernel inet_dist_use_interface {127,0,0,1}"
}

ctl() { local i=$1; shift; (node_env "$i"; "$BIN/rabbitmqctl" -n "$(name "$i")" "$@"); }

start_node() {
    local i=$1
    (node_env "$i"; "$BIN/rabbitmq-server" -detached) 9>&-
    for _ in $(seq 1 120); do
        ctl "$i" await_startup >/dev/null 2>&1 && return 0
        sleep 1
    done
    die "node $i did not start (see $BASE/n$i/log)"
}

start() {
    mkdir -p "$BASE"
    [ -f "$BASE/.erlang.cookie" ] || { head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$BASE/.erlang.cookie"; }
    chmod 400 "$BASE/.erlang.cookie"
    echo '[].' >"$BASE/enabled_plugins"
    # Afresh: nodes restarted one by one after a whole-cluster stop wait for each other's tables.
    stop
    for i in 1 2 3; do
        pkill -9 -f "sname $(name "$i")" 2>/dev/null || true
        rm -rf "$BASE/n$i/mnesia"
    done
    for i in 1 2 3; do
        log "starting $(name "$i") on port $(port "$i")"
        start_node "$i"
    done
    for i in 2 3; do
        log "joining $(name "$i") to $(name 1)"
        ctl "$i" stop_app >/dev/null 2>&1
        ctl "$i" reset >/dev/null 2>&1
        ctl "$i" join_cluster "$(name 1)" >/dev/null 2>&1 || die "$(name "$i") could not join $(name 1)"
        ctl "$i" start_app >/dev/null 2>&1
    done
    log "cluster up: $(urls)"
}

stop() {
    for i in 1 2 3; do
        ctl "$i" stop >/dev/null 2>&1 || true
    done
}

urls() {
    echo "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f"
}

leader() {
    local q=$1 line
    for i in 1 2 3; do
        line=$(ctl "$i" list_queues name leader --quiet --no-table-headers 2>/dev/null | awk -v q="$q" '$1 == q {print $2}') || true
        if [ -n "$line" ]; then
            case $line in
                *imagegen1@*) echo 1 ;; *imagegen2@*) echo 2 ;; *imagegen3@*) echo 3 ;;
                *) die "unknown leader $line" ;;
            esac
            return 0
        fi
    done
    die "no node knows queue $q"
}

connections() {
    for i in 1 2 3; do
        ctl "$i" list_connections port client_properties --quiet --no-table-headers 2>/dev/null && return 0
    done
    die "no node answers"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    stop-node) ctl "$2" stop ;;
    kill-node) kill -9 "$(cat "$BASE/n$2/pid")" ;;
    start-node) start_node "$2" ;;
    leader) leader "$2" ;;
    urls) urls ;;
    connections) connections ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
esac
