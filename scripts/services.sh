#!/usr/bin/env bash
# Install (if missing) and start (if not running) the services the test-suite
# needs: RabbitMQ on 127.0.0.1:5672 and a single-node Garage S3 store on
# 127.0.0.1:3900; and Chromium with chromedriver for the browser test. Safe to
# run repeatedly and from any clone: all Garage state lives in one machine-wide
# directory, so every checkout shares one instance.
# Meant for a dev/CI Debian 12 machine where we are root.
#
# Usage: scripts/services.sh [all|rabbitmq]   (default all; `make run` needs only RabbitMQ)
#        stop Garage with scripts/stop-services.sh
set -euo pipefail

# Root's PATH in CI may lack sbin (rabbitmq) or cargo's bin dir (garage).
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---- fixed dev facts (the test-suite relies on these) ----------------------
AMQP_PORT=5672
AMQP_URL="amqp://guest:guest@127.0.0.1:${AMQP_PORT}/%2f"

GARAGE_DIR="/var/lib/imagegen-dev/garage"
GARAGE_CONF="$GARAGE_DIR/garage.toml"
GARAGE_LOG="$GARAGE_DIR/garage.log"
GARAGE_PID="$GARAGE_DIR/garage.pid"
S3_PORT=3900
ADMIN_PORT=3903
S3_REGION="garage"
# The Garage release the suite is tested against (installed with cargo when missing).
GARAGE_VERSION="2.5.0"
BUCKET="imagegen-dev"
KEY_NAME="imagegen-dev"
KEY_ID="GK1d3a9e0c5b7f2a4e6c8d0b1f"
KEY_SECRET="9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0"

log() { echo "[services] $*" >&2; }
die() { echo "[services] ERROR: $*" >&2; exit 1; }

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# True if a real AMQP broker answers: send the AMQP 0-9-1 protocol header and
# expect a method frame (type 1, Connection.Start) back. Much cheaper than
# `rabbitmqctl status`, which boots an Erlang VM (~1 s).
amqp_answers() {
    # shellcheck disable=SC2016  # $1 is expanded by the inner bash
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3
        [ "$(head -c1 <&3 | od -An -tx1 | tr -d " ")" = "01" ]' _ "$AMQP_PORT" 2>/dev/null
}

# Poll "$@" once a second until it succeeds or $1 seconds pass.
wait_for() {
    local secs=$1 i; shift
    for ((i = 0; i < secs; i++)); do
        "$@" && return 0
        sleep 1
    done
    "$@"
}

# ---- RabbitMQ ---------------------------------------------------------------
ensure_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null; then
        log "installing rabbitmq-server"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server
    fi

    amqp_answers && return 0

    # The Debian package may have been started by the init system in the
    # meantime (e.g. right after apt-get install); only start it if needed.
    if ! rabbitmqctl status >/dev/null 2>&1; then
        log "starting rabbitmq-server"
        # 9>&- : don't let the broker inherit our lock file descriptor.
        rabbitmq-server -detached 9>&-
    fi
    log "waiting for RabbitMQ on port $AMQP_PORT"
    wait_for 60 amqp_answers || die "RabbitMQ did not come up (see /var/log/rabbitmq/)"
}

# ---- Garage -----------------------------------------------------------------
find_garage() {
    GARAGE="$(command -v garage || true)"
    if [ -z "$GARAGE" ]; then
        command -v cargo >/dev/null || die "garage is missing and cargo is not installed (install Rust via rustup first)"
        log "installing garage with cargo (takes ~10 minutes)"
        cargo install garage --version "$GARAGE_VERSION" --locked
        GARAGE="$(command -v garage)" || die "cargo install garage did not produce a garage binary"
    fi
}

g() { "$GARAGE" -c "$GARAGE_CONF" "$@"; }

# Render the config. The rpc_secret is generated on the first run and then read
# back from the existing file, so reruns produce identical content and never
# trigger a restart.
write_garage_config() {
    local secret=""
    if [ -f "$GARAGE_CONF" ]; then
        secret="$(sed -n 's/^rpc_secret *= *"\([0-9a-f]\{64\}\)".*/\1/p' "$GARAGE_CONF")"
    fi
    [ -n "$secret" ] || secret="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"

    local wanted
    wanted="$(cat <<EOF
# Single-node Garage for imagegen development/tests (written by scripts/services.sh).
metadata_dir = "$GARAGE_DIR/meta"
data_dir = "$GARAGE_DIR/data"
db_engine = "sqlite"
replication_factor = 1
# Images are compressed already: zstd (Garage's default, level 1) would only spend CPU on them.
compression_level = "none"

rpc_bind_addr = "127.0.0.1:3901"
rpc_public_addr = "127.0.0.1:3901"
rpc_secret = "$secret"

[s3_api]
s3_region = "$S3_REGION"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
EOF
)"
    # Only touch the file when its content would change (keeps reruns no-ops).
    if [ "$(cat "$GARAGE_CONF" 2>/dev/null)" != "$wanted" ]; then
        log "writing $GARAGE_CONF"
        (umask 077 && printf '%s\n' "$wanted" >"$GARAGE_CONF")
        CONFIG_CHANGED=1
    fi
}

start_garage() {
    log "starting garage server (log: $GARAGE_LOG)"
    # setsid+nohup: detach from this shell/terminal so the server outlives it.
    # 9>&- : don't let the server inherit (and hold forever) our lock.
    # NO_COLOR: plain log file without ANSI escapes.
    NO_COLOR=1 setsid nohup "$GARAGE" -c "$GARAGE_CONF" server >>"$GARAGE_LOG" 2>&1 </dev/null 9>&- &
    echo $! >"$GARAGE_PID"
    if ! wait_for 60 g status >/dev/null 2>&1; then
        tail -n 20 "$GARAGE_LOG" >&2
        die "garage did not come up (log: $GARAGE_LOG)"
    fi
}

# A fresh node has no role in the cluster layout, and buckets cannot be used
# until it has one.
ensure_garage_layout() {
    local node_id layout version
    node_id="$(g node id -q 2>/dev/null | cut -d@ -f1 || true)"
    [ -n "$node_id" ] || die "could not read the garage node id"
    layout="$(g layout show)"
    # Current roles are listed by the first 16 hex chars of the node id; stop
    # reading at the staged changes (a half-done earlier run may have left our
    # node there, assigned but not applied).
    if sed '/==== STAGED ROLE CHANGES ====/q' <<<"$layout" | grep -q "^${node_id:0:16} "; then
        return 0
    fi
    log "assigning layout role to node ${node_id:0:16}"
    g layout assign -z dc1 -c 1G "$node_id" >/dev/null
    version="$(sed -n 's/^Current cluster layout version: \([0-9]*\).*/\1/p' <<<"$layout")"
    g layout apply --version "$((version + 1))" >/dev/null
}

garage_healthy() { curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN_PORT/health" 2>/dev/null; }

ensure_garage_bucket_and_key() {
    if ! g bucket info "$BUCKET" >/dev/null 2>&1; then
        log "creating bucket $BUCKET"
        g bucket create "$BUCKET" >/dev/null
    fi
    if ! g key info "$KEY_ID" >/dev/null 2>&1; then
        log "importing key $KEY_NAME ($KEY_ID)"
        g key import --yes -n "$KEY_NAME" "$KEY_ID" "$KEY_SECRET" >/dev/null
    fi
    # `bucket info` lists each authorized key as "RWO  <key id>  <name>".
    if ! g bucket info "$BUCKET" | grep -Eq "RWO +$KEY_ID"; then
        log "granting $KEY_NAME read/write/owner on $BUCKET"
        g bucket allow --read --write --owner "$BUCKET" --key "$KEY_ID" >/dev/null
    fi
}

# A real signed S3 request (ListObjectsV2) with the dev key, so we know clients
# will actually be able to use the bucket.
s3_check() {
    curl -fsS -o /dev/null \
        --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$KEY_ID:$KEY_SECRET" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
        "http://127.0.0.1:$S3_PORT/$BUCKET?list-type=2&max-keys=1"
}

ensure_garage() {
    find_garage
    mkdir -p "$GARAGE_DIR/meta" "$GARAGE_DIR/data"
    chmod 700 "$GARAGE_DIR"

    CONFIG_CHANGED=0
    write_garage_config

    if [ "$CONFIG_CHANGED" = 1 ] && port_open "$S3_PORT"; then
        log "config changed: restarting garage"
        "$SCRIPT_DIR/stop-services.sh"
    fi
    if ! port_open "$S3_PORT"; then
        start_garage
    fi
    g status >/dev/null 2>&1 ||
        die "port $S3_PORT is open but 'garage -c $GARAGE_CONF status' fails (another S3 server on that port?)"

    ensure_garage_layout
    wait_for 30 garage_healthy || die "garage reports an unhealthy cluster (see 'garage -c $GARAGE_CONF status')"
    ensure_garage_bucket_and_key
    s3_check || die "signed S3 request to http://127.0.0.1:$S3_PORT/$BUCKET failed"
}

# ---- Chromium (the gallery's browser test) -----------------------------------
ensure_chromium() {
    if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
        log "installing chromium and chromium-driver (headless browser tests)"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver
    fi
}

# ---- main -------------------------------------------------------------------
mkdir -p "$GARAGE_DIR"
# Serialize concurrent runs (e.g. two clones starting tests at once).
exec 9>"$GARAGE_DIR/.services.lock"
flock -w 1200 9 || die "timed out waiting for another services.sh run"

ensure_rabbitmq
echo "AMQP_URL=$AMQP_URL"
[ "${1:-all}" = rabbitmq ] && exit 0

command -v curl >/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y curl; }
ensure_garage
ensure_chromium
echo "S3 endpoint=http://127.0.0.1:$S3_PORT region=$S3_REGION bucket=$BUCKET key=$KEY_ID secret=$KEY_SECRET"
