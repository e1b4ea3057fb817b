#!/usr/bin/env bash
# Stop the Garage server started by scripts/services.sh. RabbitMQ is left
# alone: it is a system service that other things may use.
# Data (bucket, key, objects) stays in /var/lib/imagegen-dev/garage, so the
# next scripts/services.sh run brings everything back as it was.
set -euo pipefail

GARAGE_DIR="/var/lib/imagegen-dev/garage"
GARAGE_CONF="$GARAGE_DIR/garage.toml"
GARAGE_PID="$GARAGE_DIR/garage.pid"

# PIDs of garage servers using our config. The pid file is the normal source;
# the command-line match also catches a server whose pid file was lost.
garage_pids() {
    local pid
    if [ -f "$GARAGE_PID" ]; then
        pid="$(cat "$GARAGE_PID")"
        # Only trust the pid file if that process really is our garage server
        # (pids get reused).
        if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null |
            grep -q -- "-c $GARAGE_CONF server"; then
            echo "$pid"
        fi
    fi
    pgrep -f -x -- "[^ ]*garage -c $GARAGE_CONF server" || true
}

mapfile -t pids < <(garage_pids | sort -u)
if [ "${#pids[@]}" -eq 0 ]; then
    echo "[stop-services] garage is not running"
    rm -f "$GARAGE_PID"
    exit 0
fi

echo "[stop-services] stopping garage (pid ${pids[*]})"
kill "${pids[@]}" 2>/dev/null || true
# Give it time to flush metadata cleanly before forcing it.
for _ in $(seq 1 20); do
    alive=()
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
    [ "${#alive[@]}" -eq 0 ] && break
    sleep 0.5
done
if [ "${#alive[@]}" -gt 0 ]; then
    echo "[stop-services] garage did not exit, killing ${alive[*]}"
    kill -9 "${alive[@]}" 2>/dev/null || true
fi
rm -f "$GARAGE_PID"
echo "[stop-services] garage stopped"
