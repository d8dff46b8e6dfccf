#!/usr/bin/env bash
# Stop the local stack started by infra/stack/up.sh: workers, Hub server, Prefect server (each by its pid file,
# with the process group it started), then PostgreSQL. `--purge` also deletes STACK_DIR (database, artifacts).
#   make stack-down            bash infra/stack/down.sh [--purge]
# STACK_STOP_GRACE_S (30): how long the services get, all together, to exit after SIGTERM before SIGKILL.
set -euo pipefail
cd "$(dirname "$0")/../.."
STACK_DIR="$(realpath -m "${STACK_DIR:-.stack}")"
RUN="$STACK_DIR/run" PGDATA="$STACK_DIR/postgres"
GRACE_S="${STACK_STOP_GRACE_S:-30}"
[[ "$GRACE_S" =~ ^[0-9]+$ ]] || { echo "[stack] error: STACK_STOP_GRACE_S=$GRACE_S is not a whole number of seconds" >&2; exit 2; }
say() { echo "[stack] $*"; }

stopping=()
for name in worker-cpu worker-gpu hub s3 prefect; do  # all at once: each may take seconds to shut down
  pidfile="$RUN/$name.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping $name (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true  # up.sh made it a group leader
    stopping+=("$name:$pid")
  fi
  rm -f "$pidfile"
done
# One grace for all of them together (not one each in turn), then SIGKILL to whatever is left: a Prefect worker
# prints "stopped!" at once and can then sit in its interpreter's exit for the whole grace.
alive() { for entry in "${stopping[@]}"; do kill -0 "${entry##*:}" 2>/dev/null && return 0; done; return 1; }
for _ in $(seq 1 $((GRACE_S * 2))); do alive || break; sleep 0.5; done
for entry in "${stopping[@]}"; do
  name="${entry%%:*}" pid="${entry##*:}"
  if kill -0 "$pid" 2>/dev/null; then
    say "$name did not stop in $GRACE_S s: killing it"
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
done

if [ -f "$PGDATA/PG_VERSION" ]; then
  PG_BIN="${PG_BIN:-$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}"
  if [ "$(id -u)" -eq 0 ]; then as_pg() { runuser -u postgres -- "$@"; }; else as_pg() { "$@"; }; fi
  if as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    say "stopping PostgreSQL"
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  fi
fi

if [ "${1:-}" = "--purge" ]; then
  say "removing $STACK_DIR"
  rm -rf "$STACK_DIR"
fi
say "down"
