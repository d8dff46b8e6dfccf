#!/usr/bin/env bash
# Prints the bin folder of the newest installed PostgreSQL server, installing Debian's `postgresql` package first
# when there is none; as root, also makes sure the `postgres` user exists (PostgreSQL refuses to run as root).
# Used by infra/stack/up.sh (`make stack`) and by the tests that start a PostgreSQL of their own (tests/hub.py).
set -euo pipefail
# PG_BIN (a server's bin folder) is taken as it is; otherwise the newest installed major
find_pg_bin() { if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; else printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1; fi; }
ready() { [ -x "$(find_pg_bin)/initdb" ] && { [ "$(id -u)" -ne 0 ] || id postgres >/dev/null 2>&1; }; }
if ! ready; then
  # one at a time (make stack and the deployments tests may ask at once; apt-get and useradd take system locks)
  exec 9>"${TMPDIR:-/tmp}/loraforge-pg-install.lock"
  flock 9
  if [ -n "${PG_BIN:-}" ] && [ ! -x "$PG_BIN/initdb" ]; then
    echo "[stack] error: PG_BIN=$PG_BIN has no initdb: point it at a PostgreSQL server's bin folder or unset it" >&2
    exit 1
  fi
  if [ ! -x "$(find_pg_bin)/initdb" ]; then
    echo "[stack] installing PostgreSQL (Debian package postgresql)" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    if [ ! -x "$(find_pg_bin)/initdb" ]; then
      echo "[stack] error: no PostgreSQL server binaries after installing (looked in /usr/lib/postgresql/*/bin)" >&2
      exit 1
    fi
  fi
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
  fi
fi
find_pg_bin
