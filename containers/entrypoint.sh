#!/bin/sh
# Entrypoint of every loraforge image. The stage images set LORAFORGE_STAGE.
#
#   podman run IMAGE CONFIG [key=value ...] --store /artifacts --input data=KEY ...
#       runs `loraforge stage $LORAFORGE_STAGE ...` on those upstream keys (see containers/README.md)
#   podman run IMAGE COMMAND ...      (COMMAND on PATH: prefect, python, loraforge, sh, ...)
#       runs it as is; this is how Prefect's Docker worker starts a flow run (`prefect flow-run execute`)
set -e
if [ "$#" -gt 0 ]; then
  case "$1" in
    -*|*=*|*.yaml|*.yml) ;;
    *) if command -v -- "$1" >/dev/null 2>&1; then exec "$@"; fi ;;
  esac
fi
if [ -z "${LORAFORGE_STAGE:-}" ]; then
  echo "loraforge-entrypoint: this image runs no stage by itself (LORAFORGE_STAGE unset); give a command, e.g. loraforge --help" >&2
  exit 1
fi
exec loraforge stage "$LORAFORGE_STAGE" "$@"
