#!/usr/bin/env bash
# Drain benchmark: one and two worker processes (release build) draining 200,000 pre-filled events
# into Postgres, each set beside the mean of a psql \copy of the same rows run just before it and one
# just after (the machine's speed drifts between runs, so each ratio compares like with like); worker
# RSS; ingest->queryable latency at 1,000 events/s; one worker draining 400 events of 1 MB each, and
# its peak RSS beside its read-ahead budget (READ_AHEAD_BYTES). Uses only 127.0.0.1 (Redis :6379,
# Postgres :5432 as user postgres), creates and drops its own database and stream keys, and stops by
# itself. Prints figures.
#
#   worker/benches/drain.sh                 # defaults
#   EVENTS=50000 BATCH_SIZES=50 RATE=1000 LATENCY_SECS=10 worker/benches/drain.sh
#   WRITE_CONCURRENCY=2 worker/benches/drain.sh          # passed to the workers (else their default)
#   REPLICAS=1 BATCH_SIZES=500 worker/benches/drain.sh    # only the one-worker drain, one batch size
#   STREAM_SHARDS=8 REPLICAS=1,2,4,8 BATCH_SIZES=500 worker/benches/drain.sh  # the fleet on owned shards
#   BENCH_WORKER_LOG=worker::store=trace BENCH_WORKER_STDOUT=1 worker/benches/drain.sh  # per-batch timings
#   WORKER_BIN=/path/to/other/worker worker/benches/drain.sh   # measure another build (e.g. a baseline)
#   LARGE_ONLY=1 READ_AHEAD_BYTES=33554432 worker/benches/drain.sh   # only the 1 MB events, a 32 MiB budget
#   LARGE_EVENTS=1000 LARGE_EVENT_BYTES=1048000 worker/benches/drain.sh  # more and larger (0: skip them)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "${WORKER_BIN:-}" ]; then
  cargo build --release -p worker --bin worker
  export WORKER_BIN="$CARGO_TARGET_DIR/release/worker"
fi
exec cargo bench -p worker --bench drain
