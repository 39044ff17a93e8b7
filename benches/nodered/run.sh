#!/usr/bin/env bash
# Runs the nightlight rule in Node-RED 4 against an MQTT broker, for benchmarks against fleetsql.
#
#   benches/nodered/run.sh HOST PORT [QOS]
#
# Installs node-red@4 into $NODERED_CACHE (default ~/.cache/fleetsql-nodered) if missing, then
# execs node, so this script's PID is the Node-RED process (measure its CPU from /proc/PID/stat).
# Ready once it logs (stdout) a line containing "Connected to broker:", e.g.
#   3 Jan 12:00:00 - [info] [mqtt-broker:bench broker] Connected to broker: mqtt://127.0.0.1:1883
# The subscription to +/telemetry is sent in the same tick right after that line.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then echo "usage: $0 HOST PORT [QOS]" >&2; exit 2; fi
here=$(cd "$(dirname "$0")" && pwd)
cache=${NODERED_CACHE:-$HOME/.cache/fleetsql-nodered}
red="$cache/node_modules/node-red/red.js"
if [ ! -f "$red" ]; then
  echo "installing node-red@4 into $cache" >&2
  npm install --prefix "$cache" --no-audit --no-fund --loglevel=error node-red@4 >&2
fi
# A fresh userDir per run, named after this PID (which node keeps through exec); Node-RED
# writes .config.*.json there, so the repo stays untouched. Dirs of dead runs are removed.
for d in "$cache"/userdir-*; do
  [ -d "$d" ] && ! kill -0 "${d##*-}" 2>/dev/null && rm -rf "$d"
done
user="$cache/userdir-$$"
mkdir -p "$user"
cp "$here/flow.json" "$user/flows.json"
# QoS of the subscription and of the commands (default 1), as fleetsql's pipeline gets it.
export MQTT_HOST="$1" MQTT_PORT="$2" MQTT_QOS="${3:-1}"
exec node "$red" --settings "$here/settings.js" --userDir "$user" "$user/flows.json"
