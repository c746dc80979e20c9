#!/usr/bin/env bash
# Context read path benchmark: GET /context/user/:id (JSON) for random users under wrk, side by
# side in the same run with pgbench running the same SQL the endpoint runs (profile by id + the
# newest 20 events through the (distinct_id, timestamp DESC) index; for an id of a person, the
# person's statement over all its ids as well).
# 1,000,000 events across 10,000 users in a fresh database, dropped at the end. Only 127.0.0.1.
#
#   api/benches/context-load.sh                 # 10 s per phase, 10 connections
#   DURATION=20 CONNECTIONS=20 api/benches/context-load.sh
#   PERSON_SIZE=3 api/benches/context-load.sh   # users joined into persons of 3 ids (1, 3, 20)
#   API_BIN=/tmp/api-base api/benches/context-load.sh  # another build of the api (A/B runs)
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-10}
THREADS=${THREADS:-2}
USERS=${USERS:-10000}
PER_USER=${PER_USER:-100}
PERSON_SIZE=${PERSON_SIZE:-1}
PORT=${PORT:-18182}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
DB="bench_context_$$"
KEY="bench-secret-key"
WORK=$(mktemp -d)

for tool in wrk pgbench psql; do command -v "$tool" >/dev/null || { echo "missing $tool"; exit 1; }; done
API_BIN=${API_BIN:-}
if [ -z "$API_BIN" ]; then
  cargo build --release -q -p api
  API_BIN=./target/release/api
fi

API_PID=""
cleanup() {
  [ -n "$API_PID" ] && kill "$API_PID" 2>/dev/null && wait "$API_PID" 2>/dev/null || true
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

psql "$PG/postgres" -qc "CREATE DATABASE $DB"
API_SECRET_KEY=$KEY API_BIND=127.0.0.1:$PORT DATABASE_URL="$PG/$DB" QUEUE_NAME="bench_ctx_stream_$$" \
  MIGRATE_ON_START=true RUST_LOG=warn "$API_BIN" &
API_PID=$!
for _ in $(seq 100); do
  [ "$(psql "$PG/$DB" -tAc "SELECT to_regclass('public.user_profiles') IS NOT NULL" 2>/dev/null)" = t ] && break
  sleep 0.2
done
echo "== loading $((USERS * PER_USER)) events for $USERS users"
time psql "$PG/$DB" -q -v users="$USERS" -v per_user="$PER_USER" -v person_size="$PERSON_SIZE" -f api/benches/context-data.sql

cat > "$WORK/context.lua" <<LUA
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/context/user/user_" .. math.random(0, $USERS - 1), {["X-API-Key"] = "$KEY"})
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT rps=%.0f p50_ms=%.2f p99_ms=%.2f non2xx=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA
# The endpoint's statement (CONTEXT_SQL in api/src/context/store.rs), with its parameters filled
# in as the endpoint binds them for a plain request (limit 20, no since, no session).
# With persons (PERSON_SIZE > 1) every id belongs to one, and the endpoint runs its second
# statement (PERSON_CONTEXT_SQL) too: so does pgbench.
python3 - "$USERS" "$PERSON_SIZE" > "$WORK/context.sql" <<'PY'
import re, sys
src = open("api/src/context/store.rs").read()
names = ["CONTEXT_SQL"] + (["PERSON_CONTEXT_SQL"] if int(sys.argv[2]) > 1 else [])
print(f"\\set uid random(0, {int(sys.argv[1]) - 1})")
for name in names:
    sql = re.search(r'\bconst ' + name + r': &str = r#"(.*?)"#', src, re.S).group(1)
    sql = sql.replace("{filters}", "").replace("{limit}", "20").replace("$1", "('user_' || :uid)")
    print(" ".join(sql.split()) + ";")
PY

# (to a file: `curl | head` fails the script under pipefail when head closes the pipe first)
curl -sf -o "$WORK/first.json" -H "X-API-Key: $KEY" "http://127.0.0.1:$PORT/context/user/user_1"
head -c 300 "$WORK/first.json"; echo
echo "== wrk GET /context/user/:id (JSON), -c $CONNECTIONS -d ${DURATION}s"
# warm-up
wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s "$WORK/context.lua" "http://127.0.0.1:$PORT" >/dev/null
# The api's CPU time (user + system, in clock ticks) around the measured phase.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$API_PID/stat"; }
CPU_BEFORE=$(cpu_ticks)
API=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/context.lua" "http://127.0.0.1:$PORT" | grep RESULT)
CPU_TICKS=$(( $(cpu_ticks) - CPU_BEFORE ))
echo "$API"
RSS_KB=$(awk '/VmHWM/ {print $2}' /proc/$API_PID/status)
echo "== pgbench, same statement, -c $CONNECTIONS -T $DURATION"
(cd "$WORK" && pgbench -n -M prepared -c "$CONNECTIONS" -j "$THREADS" -T "$DURATION" -f context.sql -l --log-prefix=pg "$PG/$DB" \
  | grep -E "^(tps|latency average)")
PG_STATS=$(cat "$WORK"/pg.* | python3 -c "
import sys
lat = sorted(int(l.split()[2]) for l in sys.stdin)
print(len(lat), lat[len(lat)//2] / 1000, lat[int(len(lat)*0.99)] / 1000)")

field() { echo "$1" | tr ' ' '\n' | grep "^$2=" | cut -d= -f2; }
python3 - "$(field "$API" rps)" "$(field "$API" p50_ms)" "$(field "$API" p99_ms)" "$(field "$API" non2xx)" $PG_STATS "$DURATION" "$RSS_KB" "$CPU_TICKS" "$(getconf CLK_TCK)" "$PERSON_SIZE" <<'PY'
import sys
rps, p50, p99, non2xx, n, pg50, pg99, dur, rss, ticks, hz, person = sys.argv[1:]
rps, p50, p99, n, pg50, pg99, dur = map(float, (rps, p50, p99, n, pg50, pg99, dur))
pg_rps = n / dur
print()
print(f"{'measure':<34}{'api JSON':>12}{'raw SQL':>12}{'ratio':>8}{'target':>10}")
print(f"{'requests/s':<34}{rps:>12.0f}{pg_rps:>12.0f}{rps/pg_rps:>8.2f}{'>=0.50':>10}")
print(f"{'p50 latency, ms':<34}{p50:>12.2f}{pg50:>12.2f}")
print(f"{'p99 latency, ms':<34}{p99:>12.2f}{pg99:>12.2f}{'':>8}{'<5':>10}")
print(f"{'non-2xx answers':<34}{int(non2xx):>12}")
print(f"{'api CPU per request, us':<34}{float(ticks) / float(hz) / (rps * dur) * 1e6:>12.1f}")
print(f"{'api peak RSS, MiB':<34}{float(rss)/1024:>12.1f}")
print(f"(ids per person: {person})")
PY
