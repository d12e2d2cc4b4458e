#!/usr/bin/env bash
# Quick HTTP check of the hot path: normserve vs the naive FastAPI app vs a bare ASGI app, with wrk.
# Each server is pinned to core 0 with one onnxruntime thread; wrk is pinned to core 1.
#   bash bench/http_check.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
PY=.venv/bin/python
BODY_FILE=$(mktemp --suffix=.json)
trap 'rm -f "$BODY_FILE"; kill $(jobs -p) 2>/dev/null || true' EXIT

# One real held-out digit, as a nested [1, 1, 8, 8] FP32 tensor.
$PY - "$BODY_FILE" <<'PY'
import json, sys
from models.data import load_splits
x = load_splits().x_test[:1]
json.dump({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]},
          open(sys.argv[1], "w"))
PY

wait_ready() {  # url
  for _ in $(seq 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "server at $1 did not start" >&2; return 1
}

measure() {  # name url
  for c in 1 16 64; do
    BODY_FILE=$BODY_FILE taskset -c 1 wrk -t1 -c$c -d2s -s bench/wrk/post.lua "$2" >/dev/null  # warm-up
    out=$(BODY_FILE=$BODY_FILE taskset -c 1 wrk -t1 -c$c -d"${SECONDS_PER_RUN}"s --latency -s bench/wrk/post.lua "$2")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    bad=$(awk '/non2xx=/ {print $1, $2}' <<<"$out")
    printf "| %s | %d | %s | %s | %s | %s |\n" "$1" "$c" "$rps" "$p50" "$p99" "$bad"
  done
}

echo "| server | connections | requests/s | p50 | p99 | failures |"
echo "|---|---|---|---|---|---|"

stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

NORMSERVE_PORT=8100 NORMSERVE_INTRA_OP_THREADS=1 NORMSERVE_LOG_LEVEL=error taskset -c 0 $PY -m service &
pid=$!
wait_ready http://127.0.0.1:8100/v2/health/ready
measure normserve http://127.0.0.1:8100/v2/models/cnn-bn/infer
stop $pid

NAIVE_THREADS=1 taskset -c 0 .venv/bin/uvicorn bench.naive_app:app --port 8101 --log-level warning --no-access-log &
pid=$!
wait_ready http://127.0.0.1:8101/docs
measure "naive FastAPI" http://127.0.0.1:8101/v2/models/cnn-bn/infer
stop $pid

taskset -c 0 .venv/bin/uvicorn bench.bare_asgi:app --port 8102 --loop uvloop --http httptools --log-level warning \
  --no-access-log &
pid=$!
wait_ready http://127.0.0.1:8102/
measure "bare ASGI" http://127.0.0.1:8102/
stop $pid
