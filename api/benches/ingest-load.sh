#!/usr/bin/env bash
# Ingest load benchmark: the api under wrk versus raw redis-benchmark XADD, one run, same
# machine, 600-byte events; each api phase is compared with the mean of a raw run just before it
# and one just after. Only 127.0.0.1 is touched; every phase stops by itself.
#
#   api/benches/ingest-load.sh            # defaults: 10 s per phase, 50 connections
#   DURATION=20 CONNECTIONS=100 api/benches/ingest-load.sh
#   API_BIN=/path/to/other/api api/benches/ingest-load.sh   # measure another build (e.g. a baseline)
#   CLUSTER_MASTERS=4 api/benches/ingest-load.sh   # then /batch on a local cluster of 4 masters
#                                                  # (STREAM_SHARDS = 4 per master), against one
#                                                  # Redis' pipelined XADD
#
# Needs: wrk, redis-benchmark, a Redis at REDIS_URL (default redis://127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-2}
PORT=${PORT:-18181}
REDIS_HOST=${REDIS_HOST:-127.0.0.1}
REDIS_PORT=${REDIS_PORT:-6379}
RUN_ID=$$
STREAM="bench_ingest_${RUN_ID}"
RAW_STREAM="bench_raw_xadd_${RUN_ID}"
WORK=$(mktemp -d)
KEY="bench-secret-key"

for tool in wrk redis-benchmark redis-cli; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y wrk redis-tools)"; exit 1; }
done

if [ -z "${API_BIN:-}" ]; then
  cargo build --release -q -p api
  API_BIN=./target/release/api
fi
API_PID=""
CLUSTER_MASTERS=${CLUSTER_MASTERS:-0}
CLUSTER_PORT=${CLUSTER_PORT:-17100}
CLUSTER_API_PID=""
cleanup() {
  [ -n "$API_PID" ] && kill "$API_PID" 2>/dev/null || true
  [ -n "$CLUSTER_API_PID" ] && kill "$CLUSTER_API_PID" 2>/dev/null || true
  for i in $(seq 0 $((CLUSTER_MASTERS - 1))); do
    redis-cli -p $((CLUSTER_PORT + i)) SHUTDOWN NOSAVE >/dev/null 2>&1 || true
  done
  redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" DEL "$STREAM" "$RAW_STREAM" >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# A realistic 600-byte posthog-js pageview.
python3 - "$WORK" <<'PY'
import json, sys, uuid
work = sys.argv[1]
def event(i):
    e = {"event": "$pageview", "distinct_id": f"user_{i % 1000}",
         "properties": {"$current_url": "https://shop.example.com/pricing?plan=pro", "$pathname": "/pricing",
                        "$host": "shop.example.com", "$browser": "Chrome", "$os": "Mac OS X",
                        "$session_id": "0190b5d6-1d3e-7cc4-b1b8-7ab1a2c3d4e5", "$lib": "web", "$lib_version": "1.200.0",
                        "$screen_height": 1080, "$screen_width": 1920, "$referrer": "https://www.google.com/",
                        "title": "Pricing - Example Shop"},
         "timestamp": "2026-11-28T10:00:00.000Z"}
    s = json.dumps(e)
    pad = 600 - len(s) - len(', "pad": ""')
    e["properties"]["pad"] = "x" * max(pad, 0)
    return e
single = json.dumps(event(1))
assert len(single) == 600, len(single)
open(f"{work}/single.json", "w").write(single)
open(f"{work}/batch.json", "w").write(json.dumps({"api_key": "bench-secret-key", "batch": [event(i) for i in range(100)]}))
open(f"{work}/value.txt", "w").write(single)
PY

for kind in single batch; do
  cat > "$WORK/$kind.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "$KEY"
local f = io.open("$WORK/$kind.json", "rb"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  io.write(string.format("RESULT rps=%.0f p50_ms=%.2f p99_ms=%.2f non2xx=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA
done

API_SECRET_KEY=$KEY API_BIND=127.0.0.1:$PORT QUEUE_NAME=$STREAM STREAM_MAX_BACKLOG=100000000 \
  MIGRATE_ON_START=false RUST_LOG=warn REDIS_URL="redis://$REDIS_HOST:$REDIS_PORT" "$API_BIN" &
API_PID=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null \
  || { echo "the api ($API_BIN) did not come up on 127.0.0.1:$PORT" >&2; exit 1; }

VALUE=$(cat "$WORK/value.txt")
raw_xadd() { # $1 = pipeline depth
  redis-benchmark -h "$REDIS_HOST" -p "$REDIS_PORT" -c "$CONNECTIONS" -P "$1" -n "$2" -q \
    XADD "$RAW_STREAM" '*' event "$VALUE" | tr '\r' '\n' | grep -oE '[0-9.]+ requests per second' | tail -1 | cut -d' ' -f1
  redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" DEL "$RAW_STREAM" >/dev/null
}
run_wrk() { # $1 = kind
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/$1.lua" "http://127.0.0.1:$PORT/$2" | grep RESULT \
    || { echo "wrk printed no result for POST /$2 (is the api up on port $PORT?)" >&2; return 1; }
}
field() { echo "$1" | tr ' ' '\n' | grep "^$2=" | cut -d= -f2; }
# The api's CPU time so far (user + system), in clock ticks: fields 14 and 15 of its stat line,
# counted after the command name (which may hold spaces) as 12 and 13.
api_ticks() { sed 's/.*) //' "/proc/$API_PID/stat" | awk '{print $12 + $13}'; }

# Each api phase runs between two raw redis-benchmark runs of its kind, and its ratio is to their
# mean: raw XADD alone moved by a third and more between runs minutes apart on a busy 2-core
# machine, so only neighbouring runs compare like with like.
echo "== single-event POST /capture (wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s) between raw XADD -P 1 runs"
P1_BEFORE=$(raw_xadd 1 300000); echo "XADD -P 1 before: ${P1_BEFORE} ops/s"
T0=$(api_ticks); SINGLE=$(run_wrk single capture); S_TICKS=$(( $(api_ticks) - T0 )); echo "$SINGLE"
redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" DEL "$STREAM" >/dev/null
P1_AFTER=$(raw_xadd 1 300000); echo "XADD -P 1 after:  ${P1_AFTER} ops/s"
echo "== POST /batch, 100 events per request, between raw XADD -P 100 runs"
P100_BEFORE=$(raw_xadd 100 2000000); echo "XADD -P 100 before: ${P100_BEFORE} ops/s"
T0=$(api_ticks); BATCH=$(run_wrk batch batch); B_TICKS=$(( $(api_ticks) - T0 )); echo "$BATCH"
redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" DEL "$STREAM" >/dev/null
P100_AFTER=$(raw_xadd 100 2000000); echo "XADD -P 100 after:  ${P100_AFTER} ops/s"
RSS_KB=$(awk '/VmHWM/ {print $2}' /proc/$API_PID/status)

# /batch on a Redis Cluster of CLUSTER_MASTERS masters (private nodes on CLUSTER_PORT…, data
# under $WORK), a second api with REDIS_CLUSTER=true and 4 shards per master.
C_RPS=0
if [ "$CLUSTER_MASTERS" -gt 0 ]; then
  SEEDS=""
  for i in $(seq 0 $((CLUSTER_MASTERS - 1))); do
    p=$((CLUSTER_PORT + i)); mkdir -p "$WORK/node-$p"
    redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file "$WORK/node-$p/nodes.conf" \
      --dir "$WORK/node-$p" --save "" --appendonly no --daemonize yes >/dev/null
    SEEDS="$SEEDS${SEEDS:+,}redis://127.0.0.1:$p"
  done
  for i in $(seq 0 $((CLUSTER_MASTERS - 1))); do
    for _ in $(seq 50); do redis-cli -p $((CLUSTER_PORT + i)) PING >/dev/null 2>&1 && break; sleep 0.1; done
  done
  redis-cli --cluster create $(for i in $(seq 0 $((CLUSTER_MASTERS - 1))); do echo "127.0.0.1:$((CLUSTER_PORT + i))"; done) \
    --cluster-replicas 0 --cluster-yes >/dev/null
  for _ in $(seq 100); do redis-cli -p "$CLUSTER_PORT" CLUSTER INFO | grep -q 'cluster_state:ok' && break; sleep 0.1; done
  API_SECRET_KEY=$KEY API_BIND=127.0.0.1:$((PORT + 1)) QUEUE_NAME=$STREAM STREAM_MAX_BACKLOG=100000000 \
    STREAM_SHARDS=$((CLUSTER_MASTERS * 4)) REDIS_CLUSTER=true REDIS_URL="$SEEDS" \
    MIGRATE_ON_START=false RUST_LOG=warn "$API_BIN" &
  CLUSTER_API_PID=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$((PORT + 1))/health" >/dev/null && break; sleep 0.1; done
  echo "== POST /batch on a cluster of $CLUSTER_MASTERS masters, STREAM_SHARDS=$((CLUSTER_MASTERS * 4))"
  CLUSTER=$(PORT=$((PORT + 1)); wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/batch.lua" \
    "http://127.0.0.1:$PORT/batch" | grep RESULT)
  echo "$CLUSTER"
  C_RPS=$(field "$CLUSTER" rps)
fi

S_RPS=$(field "$SINGLE" rps); S_P99=$(field "$SINGLE" p99_ms); B_RPS=$(field "$BATCH" rps)
python3 - "$P1_BEFORE" "$P1_AFTER" "$P100_BEFORE" "$P100_AFTER" "$S_RPS" "$S_P99" "$B_RPS" "$RSS_KB" \
  "$S_TICKS" "$B_TICKS" "$(getconf CLK_TCK)" "$DURATION" "$C_RPS" "$CLUSTER_MASTERS" <<'PY'
import sys
p1a, p1b, p100a, p100b, s_rps, s_p99, b_rps, rss_kb, s_ticks, b_ticks, hz, secs, c_rps, masters = map(float, sys.argv[1:])
cpu_us = lambda ticks, per_s: ticks / hz * 1e6 / (per_s * secs)
p1, p100 = (p1a + p1b) / 2, (p100a + p100b) / 2
b_eps = b_rps * 100
print()
print(f"{'measure':<42}{'api':>14}{'raw redis':>14}{'ratio':>8}{'target':>9}   raw before / after")
print(f"{'single-event /capture, requests/s':<42}{s_rps:>14.0f}{p1:>14.0f}{s_rps/p1:>8.2f}{'>=0.50':>9}   {p1a:.0f} / {p1b:.0f}")
print(f"{'single-event /capture, p99 ms':<42}{s_p99:>14.2f}")
print(f"{'/batch x100, events/s':<42}{b_eps:>14.0f}{p100:>14.0f}{b_eps/p100:>8.2f}{'>=0.70':>9}   {p100a:.0f} / {p100b:.0f}")
print(f"{'api peak RSS, MiB':<42}{rss_kb/1024:>14.1f}{'':>14}{'':>8}{'<64':>9}")
print(f"{'api CPU per single-event request, us':<42}{cpu_us(s_ticks, s_rps):>14.1f}")
print(f"{'api CPU per /batch event, us':<42}{cpu_us(b_ticks, b_eps):>14.2f}")
if masters > 0:
    c_eps = c_rps * 100
    label = f"/batch x100 on {masters:.0f} masters, events/s"
    print(f"{label:<42}{c_eps:>14.0f}{p100:>14.0f}{c_eps/p100:>8.2f}{'>=2.50':>9}   (one Redis' XADD -P 100)")
PY
