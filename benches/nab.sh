#!/usr/bin/env bash
# The Numenta Anomaly Benchmark (NAB) through fleetsql's detectors.
#
#   benches/nab.sh [NAB_DIR] [RESULTS_DIR]
#
# Replays every labelled file of NAB_DIR/data (default ../shared/data/nab, or
# $FLEETSQL_NAB_DIR) through pipelines/nab.sql with `fleetsql replay`, one run a file, and
# writes RESULTS_DIR/<category>/<name>.csv (default target/nab-results): `timestamp,
# anomaly_score`, one row per input row, in order. Then scores them with NAB's rules
# (../shared/tools/nab_score.py, or $NAB_SCORER), and measures the detector path's
# throughput: one replay of every file, repeated until there are at least 1M readings,
# each copy its own series.
#
# NAB_DIR is any folder shaped like NAB's: data/<category>/<name>.csv (timestamp,value) and
# labels/combined_windows.json. One pipeline configuration for every file.
#
# Environment:
#   FLEETSQL_BIN    the fleetsql binary (default: built here with `cargo build --release`)
#   NAB_SCORER      the scorer (default ../shared/tools/nab_score.py); NAB_SCORE=0 skips scoring
#   NAB_THROUGHPUT  readings for the throughput run (default 1000000; 0 skips it)
#   NAB_PIPELINE    another pipeline to score (default pipelines/nab.sql): same source and
#                   `scores` table, e.g. to compare detectors
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
nab=${1:-${FLEETSQL_NAB_DIR:-$root/../shared/data/nab}}
results=${2:-$root/target/nab-results}
scorer=${NAB_SCORER:-$root/../shared/tools/nab_score.py}
throughput=${NAB_THROUGHPUT:-1000000}
pipeline=${NAB_PIPELINE:-$root/pipelines/nab.sql}

if [ ! -d "$nab/data" ] || [ ! -f "$nab/labels/combined_windows.json" ]; then
    echo "nab.sh: $nab is not shaped like NAB (data/ and labels/combined_windows.json)." >&2
    echo "        Pass the folder as the first argument or set FLEETSQL_NAB_DIR." >&2
    exit 2
fi
if [ -z "${FLEETSQL_BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet)
    FLEETSQL_BIN="${CARGO_TARGET_DIR:-$root/target}/release/fleetsql"
fi
command -v python3 >/dev/null || { echo "nab.sh: python3 is needed (to list labelled files and score)" >&2; exit 2; }

# The labelled files, as category/name.csv, that exist under data/.
files=$(python3 - "$nab" <<'PY'
import json, os, sys
nab = sys.argv[1]
labels = json.load(open(os.path.join(nab, "labels", "combined_windows.json")))
for name in sorted(labels):
    if os.path.isfile(os.path.join(nab, "data", name)):
        print(name)
PY
)
[ -n "$files" ] || { echo "nab.sh: no labelled file of $nab/labels/combined_windows.json is under $nab/data" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$results"
count=0
start=$(date +%s.%N)
for f in $files; do
    out="$work/runs/${f%.csv}"
    mkdir -p "$(dirname "$out")" "$results/$(dirname "$f")"
    name=$(basename "$f" .csv)
    "$FLEETSQL_BIN" replay "$pipeline" --input "$nab/data/$f" \
        --set device_id="$name" --data-dir "$out" --csv --quiet 2>"$work/log" ||
        { cat "$work/log" >&2; exit 1; }
    cp "$out/scores.csv" "$results/$f"
    rows_in=$(($(awk 'END { print NR }' "$nab/data/$f") - 1))
    rows_out=$(($(awk 'END { print NR }' "$results/$f") - 1))
    if [ "$rows_in" != "$rows_out" ]; then
        echo "nab.sh: $f has $rows_in rows but $rows_out scores" >&2
        exit 1
    fi
    count=$((count + 1))
done
end=$(date +%s.%N)
echo "scored $count files into $results in $(python3 -c "print(round($end - $start, 1))") s (one replay a file)"

if [ "$throughput" -gt 0 ]; then
    # Every file as its own series, copied until there are enough readings: one replay.
    mkdir -p "$work/copies"
    total=0
    copy=0
    inputs=()
    while [ "$total" -lt "$throughput" ]; do
        for f in $files; do
            link="$work/copies/c${copy}_$(echo "$f" | tr '/' '_')"
            ln -s "$nab/data/$f" "$link"
            inputs+=(--input "$link")
            total=$((total + $(awk 'END { print NR }' "$nab/data/$f") - 1))
        done
        copy=$((copy + 1))
    done
    "$FLEETSQL_BIN" replay "$pipeline" "${inputs[@]}" \
        --key-from-file device_id --data-dir "$work/throughput" --quiet 2>"$work/log" ||
        { cat "$work/log" >&2; exit 1; }
    echo "throughput: $(grep '^replayed' "$work/log")"
fi

if [ "${NAB_SCORE:-1}" = "0" ]; then
    echo "scoring skipped (NAB_SCORE=0)"
    exit 0
fi
[ -f "$scorer" ] || { echo "nab.sh: no scorer at $scorer; set NAB_SCORER (or NAB_SCORE=0)" >&2; exit 2; }
python3 "$scorer" --nab "$nab" --results "$results"
