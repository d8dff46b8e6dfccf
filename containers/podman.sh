#!/usr/bin/env bash
# podman with loraforge's engine settings (containers/podman/containers.conf: runc, cgroupfs, file events,
# ulimits) without touching /etc/containers. Every loraforge script and test calls podman through this.
#   containers/podman.sh images 'localhost/loraforge-*'
#   containers/podman.sh system service --time=0 unix:///tmp/loraforge-podman.sock   # Docker-compatible API
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/podman/containers.conf}"
exec podman "$@"
