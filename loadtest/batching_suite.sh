#!/usr/bin/env bash
# The continuous-batching benchmarks, against servers this script starts (default model, CPU):
#   1. static vs continuous batching at the same offered load, outputs mixed 4..128 tokens
#   2. a capacity sweep, then sustained load at 80% of capacity for 2 minutes
#   3. overload at 3x capacity with a bounded queue (429s, the server stays up)
# Usage: loadtest/batching_suite.sh   (env: RATE=2.0 for step 1, PORT, OUT=loadtest/results,
#        COMPILE=wait: each server compiles its decode step before /ready, so no compile runs under load)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-loadtest/results}
RATE=${RATE:-2.0}
PORT=${PORT:-8123}
COMPILE=${COMPILE:-wait}
URL="http://127.0.0.1:$PORT"
COMMON=(--tasks 8 --zipf 1.1 --prompt-len uniform:16:64 --output-len uniform:4:128 --stream --seed 7 --no-progress)
mkdir -p "$OUT"
SERVER=""

start_server() {
  "$PY" -m server.cli serve --port "$PORT" --prefix-dir "$(mktemp -d)" --log-level warning --compile "$COMPILE" "$@" &
  SERVER=$!
  for _ in $(seq 1800); do  # --compile wait: minutes on a cold cache
    curl -fs "$URL/ready" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server did not become ready" >&2
  exit 1
}
stop_server() { kill -TERM "$SERVER"; wait "$SERVER" || true; }
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true' EXIT

echo "== 1. static vs continuous at $RATE req/s"
start_server --batching static
"$PY" -m loadtest --url "$URL" --rates "$RATE" --duration 30 "${COMMON[@]}" --label static --out "$OUT/static"
stop_server
start_server --batching continuous
"$PY" -m loadtest --url "$URL" --rates "$RATE" --duration 30 "${COMMON[@]}" --label continuous --out "$OUT/continuous"
"$PY" -m loadtest --compare "$OUT/static.json" "$OUT/continuous.json"

echo "== 2. capacity sweep, then 80% of it for 2 minutes"
"$PY" -m loadtest --url "$URL" --rates 0.5,1,2,4 --duration 30 "${COMMON[@]}" --label sweep --out "$OUT/sweep"
CAPACITY=$("$PY" -c "import json; print(json.load(open('$OUT/sweep.json'))['capacity_rps'])")
SUSTAINED=$("$PY" -c "print(round(0.8 * $CAPACITY, 2))")
OVERLOAD=$("$PY" -c "print(round(3 * $CAPACITY, 2))")
echo "capacity ~ $CAPACITY req/s: sustained at $SUSTAINED, overload at $OVERLOAD"
"$PY" -m loadtest --url "$URL" --rates "$SUSTAINED" --duration 120 --window 15 "${COMMON[@]}" --label sustained --out "$OUT/sustained"
stop_server

echo "== 3. overload at 3x capacity, queue bounded at 16"
start_server --max-queue 16
"$PY" -m loadtest --url "$URL" --rates "$OVERLOAD" --duration 60 "${COMMON[@]}" --label overload --out "$OUT/overload"
stop_server
