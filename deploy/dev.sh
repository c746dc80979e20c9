#!/usr/bin/env bash
# The pipeline on this machine in one command, from a fresh clone:
#   deploy/dev.sh            Redis and Postgres, then the api with a worker in the same process
#   deploy/dev.sh test       the same services, then the test command of README.md
#   deploy/dev.sh services   the services alone, until Ctrl-C
#
# Redis and Postgres already answering at REDIS_URL and DATABASE_URL (environment, else .env,
# else .env.example) are used as they are. When nothing answers and a URL points at this machine,
# a private instance starts on exactly that port, its data under target/dev/ (kept between runs):
# from binaries found here, else installed with apt-get, dnf or brew (named before installing),
# else in Docker. Ctrl-C (SIGINT or SIGTERM) stops what this script started, and only that.
#
# Knobs, for scripts and tests: DEV_DIR (data directory, default target/dev), DEV_API_BIN (a
# built api binary instead of `cargo run -p api`), DEV_TEST_COMMAND (instead of README's command),
# DEV_PG_USER (the unprivileged user a root caller runs Postgres as).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEV_DIR=${DEV_DIR:-$ROOT/target/dev}
case $DEV_DIR in /*) ;; *) DEV_DIR=$ROOT/$DEV_DIR ;; esac
MODE=${1:-run}
case $MODE in
  run | test | services) ;;
  -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: deploy/dev.sh [run|test|services]" >&2; exit 2 ;;
esac

log() { printf 'dev: %s\n' "$*"; }
die() { printf 'dev: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
is_root() { [ "$(id -u)" = 0 ]; }

# --- settings: environment, else .env, else .env.example (as the binaries read them) ----------

# The last `NAME=value` of a dotenv file, unquoted; fails when the file does not set it.
file_value() {
  local file=$1 name=$2 line value
  [ -f "$file" ] || return 1
  line=$(grep -E "^[[:space:]]*(export[[:space:]]+)?$name=" "$file" | tail -n 1) || return 1
  [ -n "$line" ] || return 1
  value=${line#*=}
  case $value in
    \"*) value=${value#\"}; value=${value%%\"*} ;;
    \'*) value=${value#\'}; value=${value%%\'*} ;;
    *) value=${value%%[[:space:]]#*}; value=${value%"${value##*[![:space:]]}"} ;;
  esac
  printf '%s' "$value"
}

setting() {
  local name=$1
  if [ -n "${!name:-}" ]; then
    printf '%s' "${!name}"
  else
    file_value "$ROOT/.env" "$name" || file_value "$ROOT/.env.example" "$name" || printf '%s' "$2"
  fi
}

REDIS_URL=$(setting REDIS_URL redis://127.0.0.1:6379)
DATABASE_URL=$(setting DATABASE_URL postgres://postgres@127.0.0.1:5432/postgres)
API_BIND=$(setting API_BIND 127.0.0.1:8000)
export REDIS_URL DATABASE_URL API_BIND

# Splits a URL into URL_SCHEME, URL_USER, URL_PASSWORD, URL_HOST, URL_PORT (or $2), URL_PATH
# (the database, for Postgres) and URL_QUERY.
parse_url() {
  local url=$1 rest authority userinfo hostport
  URL_SCHEME=${url%%://*}
  rest=${url#*://}
  authority=${rest%%[/?]*}
  rest=${rest#"$authority"}
  URL_PATH=${rest%%\?*}
  URL_PATH=${URL_PATH#/}
  URL_QUERY=
  case $rest in *\?*) URL_QUERY="?${rest#*\?}" ;; esac
  URL_USER='' URL_PASSWORD=''
  case $authority in
    *@*)
      userinfo=${authority%@*}
      URL_USER=${userinfo%%:*}
      case $userinfo in *:*) URL_PASSWORD=${userinfo#*:} ;; esac
      ;;
  esac
  hostport=${authority##*@}
  case $hostport in
    \[*) URL_HOST=${hostport#[}; URL_HOST=${URL_HOST%%]*}; URL_PORT=${hostport#*]}; URL_PORT=${URL_PORT#:} ;;
    *:*) URL_HOST=${hostport%%:*}; URL_PORT=${hostport#*:} ;;
    *) URL_HOST=$hostport; URL_PORT= ;;
  esac
  URL_HOST=${URL_HOST:-localhost}
  URL_PORT=${URL_PORT:-$2}
}

is_local() { case $1 in 127.0.0.1 | localhost | ::1 | 0.0.0.0) return 0 ;; *) return 1 ;; esac }

# Something accepts TCP connections at host:port.
tcp_open() {
  local host=$1
  [ "$host" = 0.0.0.0 ] && host=127.0.0.1
  if have timeout; then
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$2" 2>/dev/null
  else
    (exec 3<>"/dev/tcp/$host/$2") 2>/dev/null
  fi
}

parse_url "$REDIS_URL" 6379
REDIS_HOST=$URL_HOST REDIS_PORT=$URL_PORT REDIS_USER=$URL_USER REDIS_PASSWORD=$URL_PASSWORD
[ "$URL_SCHEME" = redis ] || [ "$URL_SCHEME" = rediss ] || die "REDIS_URL is not a redis:// URL: $REDIS_URL"
parse_url "$DATABASE_URL" 5432
PG_HOST=$URL_HOST PG_PORT=$URL_PORT PG_USER=${URL_USER:-postgres} PG_DB=${URL_PATH:-postgres}
PG_SERVER_URL=${DATABASE_URL%%/"$URL_PATH$URL_QUERY"}
case $DATABASE_URL in
  postgres://* | postgresql://*) ;;
  *) die "DATABASE_URL is not a postgres:// URL: $DATABASE_URL" ;;
esac
# The same server's `postgres` database, where databases are created.
PG_ADMIN_URL=${PG_SERVER_URL%/}/postgres$URL_QUERY

# --- what this run started, stopped in reverse on exit ------------------------------------------

JOB_PID=''      # the api or the test command
REDIS_PID=''    # a private redis-server
PG_PID=''       # a private postmaster
REDIS_DOCKER='' # or the same in Docker
PG_DOCKER=''
STOPPING=''

# Starts a command in the background in a process group of its own (its output to $1, or ours
# for -), so that a terminal's Ctrl-C reaches this script alone and the script stops everything
# in order: the api or the tests first, then the services they use. Sets SPAWNED.
spawn() {
  local log=$1
  shift
  set -m
  if [ "$log" = - ]; then "$@" </dev/null & else "$@" </dev/null >>"$log" 2>&1 & fi
  SPAWNED=$!
  set +m
}

# Sends $2 to process $1 (to its whole group with $4 = group), waits up to $3 seconds for it to
# end, then kills it.
stop_pid() {
  local pid=$1 signal=$2 tenths=$(($3 * 10)) target=$1
  [ -n "$pid" ] || return 0
  [ "${4:-}" = group ] && target=-$pid
  kill "-$signal" -- "$target" 2>/dev/null || kill "-$signal" "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && [ "$tenths" -gt 0 ]; do
    sleep 0.1
    tenths=$((tenths - 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "process $pid did not stop within $3 s: killing it"
    kill -KILL -- "$target" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# Calls $2 every 0.2 s until it succeeds, for a minute at most; gives up at once when the
# service's process ($3, if any) has ended, showing the end of its log ($4).
await_ready() {
  local tries=0
  until "$2"; do
    tries=$((tries + 1))
    if [ "$tries" -gt 300 ] || { [ -n "$3" ] && ! kill -0 "$3" 2>/dev/null; }; then
      if [ -f "$4" ]; then tail -n 20 "$4" >&2; fi
      die "the private $1 did not start${4:+ (log: $4)}"
    fi
    sleep 0.2
  done
  # Answered, but by someone else holding the port?
  if [ -n "$3" ] && ! kill -0 "$3" 2>/dev/null; then
    if [ -f "$4" ]; then tail -n 20 "$4" >&2; fi
    die "the private $1 exited${4:+ (log: $4)}"
  fi
}

# Stops the private service $1: process $2 with signal $3 (for $4 seconds at most), or container $5.
stop_service() {
  if [ -n "$2" ]; then
    log "stopping the private $1"
    stop_pid "$2" "$3" "$4"
  elif [ -n "$5" ]; then
    log "stopping the private $1"
    docker stop "$5" >/dev/null 2>&1 || true
  fi
}

stop_all() {
  [ -z "$STOPPING" ] || return 0
  STOPPING=1
  # A second Ctrl-C must not cut the stop short and leave services behind.
  trap '' INT TERM
  # The api's own grace for requests and its worker's SHUTDOWN_TIMEOUT fit in 30 s.
  stop_pid "$JOB_PID" TERM 30 group
  JOB_PID=''
  stop_redis
  stop_postgres
}

on_signal() {
  log "stopping (SIG$1)"
  stop_all
  [ "$1" = INT ] && exit 130
  exit 143
}

trap stop_all EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

# --- packages -------------------------------------------------------------------------------------

SUDO=
APT_UPDATED=

# install redis|postgres|openssl with the platform's package manager; fails when there is none to use.
install() {
  if have apt-get || have dnf; then
    if is_root; then
      SUDO=
    elif have sudo; then
      SUDO=sudo
    else
      log "not root and no sudo: cannot install $1 with the package manager"
      return 1
    fi
  fi
  if have apt-get; then
    if [ "$1" = redis ]; then
      apt_install redis-server
    elif [ "$1" = openssl ]; then
      apt_install openssl
    else
      # postgresql-common first, told to make no system cluster: the package would otherwise
      # start one on 5432 with password logins, taking the port this script wants.
      apt_install postgresql-common
      log "setting create_main_cluster = false in /etc/postgresql-common/createcluster.conf"
      $SUDO sed -i -E 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' \
        /etc/postgresql-common/createcluster.conf
      apt_install postgresql
    fi
  elif have dnf; then
    local package=redis
    [ "$1" = postgres ] && package=postgresql-server
    [ "$1" = openssl ] && package=openssl
    log "installing $package with: $SUDO dnf install -y $package"
    $SUDO dnf install -y -q "$package"
  elif have brew; then
    local package=redis
    [ "$1" = postgres ] && package=postgresql@17
    [ "$1" = openssl ] && package=openssl
    log "installing $package with: brew install $package"
    brew install --quiet "$package"
  else
    return 1
  fi
}

apt_install() {
  log "installing $* with: ${SUDO:+$SUDO }apt-get install $*"
  if [ -z "$APT_UPDATED" ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

docker_usable() { have docker && docker info >/dev/null 2>&1; }

# --- Redis ----------------------------------------------------------------------------------------

REDIS_DIR=$DEV_DIR/redis
REDIS_CONTAINER=clickstream-dev-redis-$REDIS_PORT

redis_ping() {
  if [ -n "$REDIS_DOCKER" ]; then
    local auth=()
    if [ -n "$REDIS_PASSWORD" ]; then auth=(--no-auth-warning -a "$REDIS_PASSWORD"); fi
    if [ -n "$REDIS_PASSWORD" ] && [ -n "$REDIS_USER" ]; then auth+=(--user "$REDIS_USER"); fi
    docker exec "$REDIS_CONTAINER" redis-cli ${auth[@]+"${auth[@]}"} ping 2>/dev/null | grep -q PONG
  elif have redis-cli && [ "${REDIS_URL%%://*}" = redis ]; then
    redis-cli -u "$REDIS_URL" --no-auth-warning ping 2>&1 | grep -q PONG
  else
    tcp_open "$REDIS_HOST" "$REDIS_PORT"
  fi
}

redis_auth_args() {
  if [ -n "$REDIS_PASSWORD" ] && [ -n "$REDIS_USER" ] && [ "$REDIS_USER" != default ]; then
    printf '%s\n' --user "$REDIS_USER" on ">$REDIS_PASSWORD" '~*' '&*' +@all
  elif [ -n "$REDIS_PASSWORD" ]; then
    printf '%s\n' --requirepass "$REDIS_PASSWORD"
  fi
}

start_redis() {
  if tcp_open "$REDIS_HOST" "$REDIS_PORT"; then
    redis_ping || die "something answers at $REDIS_HOST:$REDIS_PORT, but not as Redis with REDIS_URL's credentials ($REDIS_URL)"
    log "redis answering at $REDIS_HOST:$REDIS_PORT"
    return
  fi
  is_local "$REDIS_HOST" ||
    die "nothing answers at $REDIS_HOST:$REDIS_PORT (REDIS_URL) and it is not this machine: start it, or point REDIS_URL at 127.0.0.1"
  [ "${REDIS_URL%%://*}" = redis ] ||
    die "nothing answers at REDIS_URL ($REDIS_URL); a private Redis here speaks plain redis://, not TLS"
  if ! have redis-server; then
    log "redis-server not found"
    install redis || true
    if tcp_open "$REDIS_HOST" "$REDIS_PORT"; then
      redis_ping || die "the redis installed here answers at $REDIS_HOST:$REDIS_PORT, but not with REDIS_URL's credentials"
      log "redis answering at $REDIS_HOST:$REDIS_PORT (started by its package)"
      return
    fi
  fi
  local auth=()
  while IFS= read -r arg; do auth+=("$arg"); done < <(redis_auth_args)
  mkdir -p "$REDIS_DIR"
  if have redis-server; then
    log "starting a private redis on $REDIS_PORT (data: ${REDIS_DIR#"$ROOT"/})"
    # Append-only file: accepted events survive a restart of this Redis, as in production.
    spawn - redis-server --port "$REDIS_PORT" --bind 127.0.0.1 -::1 --dir "$REDIS_DIR" \
      --appendonly yes --save "" --logfile "$REDIS_DIR/redis.log" ${auth[@]+"${auth[@]}"}
    REDIS_PID=$SPAWNED
  elif docker_usable; then
    log "starting a private redis in Docker on $REDIS_PORT (data: docker volume $REDIS_CONTAINER)"
    REDIS_DOCKER=$REDIS_CONTAINER
    docker run -d --rm --name "$REDIS_CONTAINER" -p "127.0.0.1:$REDIS_PORT:6379" \
      -v "$REDIS_CONTAINER:/data" redis:7-alpine \
      redis-server --appendonly yes ${auth[@]+"${auth[@]}"} >/dev/null
  else
    die "no redis-server here, none installed (no apt-get, dnf or brew usable) and no Docker: install Redis 7, or point REDIS_URL at one"
  fi
  await_ready redis redis_ping "$REDIS_PID" "${REDIS_PID:+$REDIS_DIR/redis.log}"
  log "redis answering at $REDIS_HOST:$REDIS_PORT"
}

# SIGTERM: Redis flushes the append-only file before it exits.
stop_redis() {
  stop_service redis "$REDIS_PID" TERM 30 "$REDIS_DOCKER"
  REDIS_PID='' REDIS_DOCKER=''
}

# --- Postgres -------------------------------------------------------------------------------------

PG_DIR=$DEV_DIR/pg
PG_BIN=''
PG_RUN_AS=''
PG_PSQL=''
PG_CONTAINER=clickstream-dev-postgres-$PG_PORT

pg_major() { "$1/pg_ctl" --version 2>/dev/null | sed -E 's/^[^0-9]*([0-9]+).*/\1/'; }

# The directory with initdb, pg_ctl and postgres: on PATH, Debian's /usr/lib/postgresql/*/bin,
# Fedora's, Homebrew's. The major version of an existing cluster wins, else the newest.
find_pg_bin() {
  local dir best='' best_major=0 major wanted=''
  [ -f "$PG_DIR/data/PG_VERSION" ] && wanted=$(cat "$PG_DIR/data/PG_VERSION")
  for dir in "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")" \
    /usr/lib/postgresql/*/bin /usr/pgsql-*/bin /opt/homebrew/opt/postgresql@*/bin \
    /usr/local/opt/postgresql@*/bin /opt/homebrew/bin /usr/local/bin /usr/bin; do
    if [ ! -x "$dir/initdb" ] || [ ! -x "$dir/pg_ctl" ] || [ ! -x "$dir/postgres" ]; then continue; fi
    major=$(pg_major "$dir")
    if [ -n "$wanted" ] && [ "$major" = "$wanted" ]; then
      PG_BIN=$dir
      return 0
    fi
    if [ "${major:-0}" -gt "$best_major" ]; then best=$dir best_major=$major; fi
  done
  PG_BIN=$best
  [ -n "$PG_BIN" ]
}

# Runs a Postgres program as the cluster's owner (Postgres refuses to run as root). setpriv
# executes it in place, so the postmaster stays this script's child, stopped and reaped here.
as_pg() { (pg_exec "$@"); }

# as_pg in place of the calling (sub)shell: the postmaster started with it is spawn's own child.
pg_exec() {
  cd "$PG_DIR"
  if [ -z "$PG_RUN_AS" ]; then
    exec "$@"
  else
    exec setpriv --reuid="$PG_RUN_AS" --regid="$(id -g "$PG_RUN_AS")" --clear-groups -- "$@"
  fi
}

pg_ready() {
  if [ -x "$PG_BIN/pg_isready" ]; then
    "$PG_BIN/pg_isready" -q -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres
  else
    "$PG_PSQL" -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1
  fi
}

# -h: the image's first start runs a temporary server on its socket only; wait for the real one.
pg_docker_ready() { docker exec "$PG_CONTAINER" pg_isready -q -h 127.0.0.1 -U "$PG_USER" -d "$PG_DB"; }

pg_query() { "$PG_PSQL" "$1" -Atqc "$2"; }

start_postgres() {
  if tcp_open "$PG_HOST" "$PG_PORT"; then
    log "postgres answering at $PG_HOST:$PG_PORT"
    check_database
    return
  fi
  is_local "$PG_HOST" ||
    die "nothing answers at $PG_HOST:$PG_PORT (DATABASE_URL) and it is not this machine: start it, or point DATABASE_URL at 127.0.0.1"
  if ! find_pg_bin; then
    log "no Postgres server binaries (initdb, postgres) found"
    install postgres || true
    find_pg_bin || true
    if tcp_open "$PG_HOST" "$PG_PORT"; then
      log "postgres answering at $PG_HOST:$PG_PORT (started by its package)"
      check_database
      return
    fi
  fi
  if [ -n "$PG_BIN" ]; then
    start_native_postgres
  elif docker_usable; then
    log "starting a private postgres in Docker on $PG_PORT (data: docker volume $PG_CONTAINER)"
    PG_DOCKER=$PG_CONTAINER
    docker run -d --rm --name "$PG_CONTAINER" -p "127.0.0.1:$PG_PORT:5432" \
      -e POSTGRES_HOST_AUTH_METHOD=trust -e POSTGRES_USER="$PG_USER" -e POSTGRES_DB="$PG_DB" \
      -v "$PG_CONTAINER:/var/lib/postgresql/data" postgres:15-alpine >/dev/null
    await_ready postgres pg_docker_ready '' ''
  else
    die "no Postgres here, none installed (no apt-get, dnf or brew usable) and no Docker: install PostgreSQL 15+, or point DATABASE_URL at one"
  fi
  log "postgres answering at $PG_HOST:$PG_PORT"
  check_database
}

start_native_postgres() {
  PG_PSQL=$PG_BIN/psql
  have "$PG_PSQL" || PG_PSQL=psql
  if is_root; then
    PG_RUN_AS=${DEV_PG_USER:-}
    if [ -z "$PG_RUN_AS" ]; then
      if id postgres >/dev/null 2>&1; then PG_RUN_AS=postgres; else PG_RUN_AS=nobody; fi
    fi
    have setpriv || die "running Postgres for root needs setpriv (util-linux) to run it as $PG_RUN_AS"
  fi
  mkdir -p "$PG_DIR"
  if [ -n "$PG_RUN_AS" ]; then
    chown "$PG_RUN_AS" "$PG_DIR"
    if ! as_pg test -w "$PG_DIR"; then
      # A checkout under a private home (/root) is out of the unprivileged user's reach.
      PG_DIR=${TMPDIR:-/tmp}/clickstream-dev-pg-$(printf '%s' "$DEV_DIR" | cksum | cut -d' ' -f1)
      log "$PG_RUN_AS cannot reach $DEV_DIR: the cluster goes to $PG_DIR instead"
      mkdir -p "$PG_DIR"
      chown "$PG_RUN_AS" "$PG_DIR"
    fi
  fi
  chmod 700 "$PG_DIR"
  local version
  version=$(pg_major "$PG_BIN")
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    log "creating a postgres $version cluster in ${PG_DIR#"$ROOT"/}/data (superuser postgres, trust auth${PG_RUN_AS:+, run as $PG_RUN_AS})"
    as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --locale=C \
      >"$PG_DIR/initdb.log" 2>&1 || { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
    cat >>"$PG_DIR/data/postgresql.conf" <<'EOF'

# deploy/dev.sh: a private development cluster, reached over TCP on this machine only.
listen_addresses = 'localhost'
unix_socket_directories = ''
EOF
  elif [ "$(cat "$PG_DIR/data/PG_VERSION")" != "$version" ]; then
    die "${PG_DIR#"$ROOT"/}/data is a postgres $(cat "$PG_DIR/data/PG_VERSION") cluster and only postgres $version is here: remove the directory to start afresh"
  fi
  log "starting a private postgres on $PG_PORT (data: ${PG_DIR#"$ROOT"/}/data${PG_RUN_AS:+, as $PG_RUN_AS})"
  spawn "$PG_DIR/postgres.log" pg_exec "$PG_BIN/postgres" -D "$PG_DIR/data" -p "$PG_PORT"
  PG_PID=$SPAWNED
  await_ready postgres pg_ready "$PG_PID" "$PG_DIR/postgres.log"
}

# SIGINT: Postgres' fast shutdown (sessions ended, a clean checkpoint, no recovery at the next start).
stop_postgres() {
  stop_service postgres "$PG_PID" INT 60 "$PG_DOCKER"
  PG_PID='' PG_DOCKER=''
}

# DATABASE_URL's role and database exist and let us in, made here when this script started the server.
check_database() {
  [ -n "$PG_PSQL" ] || PG_PSQL=psql
  if ! have "$PG_PSQL"; then
    [ -n "$PG_DOCKER" ] || log "no psql here: DATABASE_URL's login is not checked"
    return 0
  fi
  local out
  if out=$(pg_query "$DATABASE_URL" 'select 1' 2>&1); then return 0; fi
  if [ -n "$PG_PID" ]; then
    local super=postgres://postgres@$PG_HOST:$PG_PORT/postgres
    case $PG_HOST in *:*) super=postgres://postgres@[$PG_HOST]:$PG_PORT/postgres ;; esac
    if [ "$PG_USER" != postgres ] &&
      [ -z "$(pg_query "$super" "select 1 from pg_roles where rolname = '$PG_USER'")" ]; then
      log "creating role $PG_USER"
      pg_query "$super" "create role \"$PG_USER\" superuser login" >/dev/null
    fi
    if [ -z "$(pg_query "$super" "select 1 from pg_database where datname = '$PG_DB'")" ]; then
      log "creating database $PG_DB"
      pg_query "$super" "create database \"$PG_DB\" owner \"$PG_USER\"" >/dev/null
    fi
    out=$(pg_query "$DATABASE_URL" 'select 1' 2>&1) && return 0
  else
    case $out in
      *'database "'*'" does not exist'*)
        log "creating database $PG_DB"
        pg_query "$PG_ADMIN_URL" "create database \"$PG_DB\"" >/dev/null && return 0
        ;;
    esac
  fi
  out=${out##*FATAL:}
  die "postgres at $PG_HOST:$PG_PORT refuses DATABASE_URL ($DATABASE_URL):${out}
  Give DATABASE_URL (in .env) a user and password this server accepts, or point it at a free port
  on 127.0.0.1 (e.g. postgres://postgres@127.0.0.1:5433/postgres) for a private Postgres there."
}

# GET path answers 200 (plain HTTP/1.0 over bash's /dev/tcp: curl is not everywhere).
http_ok() {
  (
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$3" "$1" >&3
    IFS= read -r -t 5 status_line <&3 || exit 1
    case $status_line in "HTTP/1."?" 200"*) exit 0 ;; *) exit 1 ;; esac
  ) 2>/dev/null
}

# --- the run --------------------------------------------------------------------------------------

mkdir -p "$DEV_DIR"
start_redis
start_postgres

case $MODE in
  services)
    log "REDIS_URL=$REDIS_URL DATABASE_URL=$DATABASE_URL"
    if [ -z "$REDIS_PID$PG_PID$REDIS_DOCKER$PG_DOCKER" ]; then
      log "both were already running: nothing to stop"
      exit 0
    fi
    log "Ctrl-C stops the services started here"
    if [ -n "$REDIS_DOCKER$PG_DOCKER" ]; then
      while :; do sleep 1; done
    fi
    wait || true
    ;;
  test)
    if [ -n "${DEV_TEST_COMMAND:-}" ]; then
      command=$DEV_TEST_COMMAND
    else
      command=$(awk '/<!-- ci:test-command -->/ { getline; getline; print; exit }' README.md)
      [ -n "$command" ] || die "README.md has no test command after <!-- ci:test-command -->"
    fi
    # The suite also starts servers of its own (a TLS-only Redis; a private Postgres for the
    # dev.sh test) and makes certificates: those binaries must be here even when the services
    # answered without them.
    if ! have redis-server; then
      log "the tests start redis-server themselves"
      install redis || die "cannot install redis-server: install it, then run this again"
    fi
    if ! find_pg_bin; then
      log "the tests run initdb themselves"
      install postgres || die "cannot install Postgres: install it, then run this again"
      find_pg_bin || die "no initdb after installing Postgres"
    fi
    if ! have openssl; then
      log "the tests make certificates with openssl"
      install openssl || die "cannot install openssl: install it, then run this again"
    fi
    # Both spellings the test suites read.
    export TEST_REDIS_URL=$REDIS_URL TEST_DATABASE_ADMIN_URL=$DATABASE_URL
    # psql beside the server binaries (Homebrew's are not on PATH); the api tests drop databases with it.
    if [ -n "$PG_BIN" ]; then export PATH="$PG_BIN:$PATH"; fi
    log "running: $command"
    started=$SECONDS
    spawn - bash -euo pipefail -c "$command"
    JOB_PID=$SPAWNED
    status=0
    wait "$JOB_PID" || status=$?
    JOB_PID=''
    if [ "$status" = 0 ]; then
      log "tests passed ($((SECONDS - started)) s)"
    else
      log "tests failed (exit status $status, $((SECONDS - started)) s)"
    fi
    exit "$status"
    ;;
  run)
    parse_url "http://$API_BIND" 8000
    api_host=$URL_HOST
    case $api_host in 0.0.0.0 | ::) api_host=127.0.0.1 ;; esac
    case $api_host in *:*) api_url="http://[$api_host]:$URL_PORT" ;; *) api_url="http://$api_host:$URL_PORT" ;; esac
    # The api applies pending migrations before it serves (under an advisory lock).
    export MIGRATE_ON_START=true
    if [ -n "${DEV_API_BIN:-}" ]; then
      log "starting the api with a worker ($DEV_API_BIN --with-worker): migrations first"
      spawn - "$DEV_API_BIN" --with-worker
    else
      log "building and starting the api with a worker (cargo run -p api -- --with-worker): migrations first"
      spawn - cargo run -p api -- --with-worker
    fi
    JOB_PID=$SPAWNED
    until http_ok "$api_host" "$URL_PORT" /health; do
      kill -0 "$JOB_PID" 2>/dev/null || break
      sleep 0.3
    done
    if kill -0 "$JOB_PID" 2>/dev/null; then
      log "api answering at $api_url (docs: $api_url/docs); Ctrl-C stops it and what dev.sh started"
      key=$(setting API_SECRET_KEY '')
      [ "$key" = "$(file_value "$ROOT/.env.example" API_SECRET_KEY)" ] || key='<API_SECRET_KEY>'
      log "a user's context: curl -s $api_url/context/user/user_1 -H 'X-API-Key: $key'"
    fi
    status=0
    wait "$JOB_PID" || status=$?
    JOB_PID=''
    log "the api exited (status $status)"
    exit "$status"
    ;;
esac
