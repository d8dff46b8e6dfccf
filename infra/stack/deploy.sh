#!/usr/bin/env bash
# Create loraforge's work pools (if missing) and deploy every deployment in infra/prefect.yaml.
#   bash infra/stack/deploy.sh            (make deploy; make stack runs it too)
# Needs PREFECT_API_URL. Settings, all with defaults (see the header of infra/prefect.yaml):
#   LORAFORGE_POOL_TYPE     process (default: workers run stages as processes from LORAFORGE_CODE_DIR), docker or
#                           kubernetes (pools from infra/k8s/{cpu,gpu}-pool.json; docs/operations.md, Kubernetes)
#   LORAFORGE_CPU_POOL_TYPE / LORAFORGE_GPU_POOL_TYPE   the type of loraforge-cpu / loraforge-gpu alone
#                           (default: LORAFORGE_POOL_TYPE), e.g. LORAFORGE_GPU_POOL_TYPE=kubernetes: train on a cluster
#   LORAFORGE_GPUS          train runs at once: loraforge-gpu's concurrency limit, set on every deploy (default: 1)
#   LORAFORGE_CODE_DIR      where the project is on the workers       (default: this checkout)
#   LORAFORGE_CONFIG        config of the scheduled/triggered runs    (default: flows/configs/demo.yaml)
#   LORAFORGE_STORE         the artifact store all workers share      (default: ./artifacts, absolute)
#   LORAFORGE_IMAGE_PREFIX / LORAFORGE_IMAGE_TAG   stage images       (default: localhost/ and the git sha)
#   LORAFORGE_PREFECT_FILE  the deployments to deploy              (default: infra/prefect.yaml; a copy you changed,
#                           e.g. other images or job variables, deploys the same way)
#   LORAFORGE_NIGHTLY       on (default): the pipeline's nightly schedule (02:00 UTC) is deployed active; off: it is
#                           deployed switched off (a dev stack, a test server: nothing starts behind your back);
#                           switch it on later in the Prefect UI or with `prefect deployment schedule resume`
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server (make stack prints it)}"
export LORAFORGE_CODE_DIR="${LORAFORGE_CODE_DIR:-$PWD}"
export LORAFORGE_CONFIG="${LORAFORGE_CONFIG:-flows/configs/demo.yaml}"
export LORAFORGE_STORE="${LORAFORGE_STORE:-$PWD/artifacts}"
export LORAFORGE_IMAGE_PREFIX="${LORAFORGE_IMAGE_PREFIX:-localhost/}"
export LORAFORGE_IMAGE_TAG="${LORAFORGE_IMAGE_TAG:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo dev)}"
POOL_TYPE="${LORAFORGE_POOL_TYPE:-process}"
PREFECT_FILE="${LORAFORGE_PREFECT_FILE:-infra/prefect.yaml}"
if [[ ! -f "$PREFECT_FILE" ]]; then
  echo "deploy: LORAFORGE_PREFECT_FILE: no file $PREFECT_FILE (give the path of a prefect.yaml, e.g. infra/prefect.yaml)" >&2
  exit 2
fi
case "${LORAFORGE_NIGHTLY:-on}" in
  on) ;;
  off)
    # The same file with the schedule deployed inactive, in one deploy: no window in which it could fire.
    SOURCE="$PREFECT_FILE"
    PREFECT_FILE="$(mktemp --suffix=.yaml)"
    trap 'rm -f "$PREFECT_FILE"' EXIT
    "$PY" - "$SOURCE" "$PREFECT_FILE" <<'PYEOF'
import sys

import yaml

source, target = sys.argv[1:]
spec = yaml.safe_load(open(source).read())
for deployment in spec["deployments"]:
    for schedule in deployment.get("schedules") or []:
        schedule["active"] = False
open(target, "w").write(yaml.safe_dump(spec, sort_keys=False))
PYEOF
    ;;
  *) echo "deploy: LORAFORGE_NIGHTLY must be on or off, got '${LORAFORGE_NIGHTLY}'" >&2; exit 2 ;;
esac

"$PY" - "${LORAFORGE_GPUS:-1}" "loraforge-cpu=${LORAFORGE_CPU_POOL_TYPE:-$POOL_TYPE}" \
  "loraforge-gpu=${LORAFORGE_GPU_POOL_TYPE:-$POOL_TYPE}" <<'PYEOF'
import json
import sys

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectNotFound
from prefect.workers.base import BaseWorker

gpus, *pools = sys.argv[1:]
if not gpus.isdigit() or int(gpus) < 1:
    sys.exit(f"deploy: LORAFORGE_GPUS must be a whole number of train runs at once (1 or more), got {gpus!r}")


# A docker pool's flow-run container runs the engine, as a process worker does, instead of Prefect's default
# `prefect flow-run execute`: that command is the CLI, which starts a workspace supervisor, which starts the
# engine (three Python processes importing Prefect before a stage starts). Measured on the containers test's
# pipeline: 5.5 -> 3.5 s from a stage run's scheduled time to its start, 85 -> 71 s for the 7 stages. The engine
# installs its own SIGTERM handler, so a stopped container's run still ends as cancelled.
ENGINE = "python -m prefect.engine"


def base_job_template(name: str, pool_type: str) -> dict:
    """loraforge's own template for a kubernetes pool (infra/k8s/), else the worker type's default; a docker
    pool's containers start Prefect's engine itself (ENGINE)."""
    if pool_type == "kubernetes":
        return json.loads(open(f"infra/k8s/{name.removeprefix('loraforge-')}-pool.json").read())
    worker = BaseWorker.get_worker_class_from_type(pool_type)
    if worker is None:
        sys.exit(f"deploy: no Prefect worker type {pool_type!r} installed (process is built in; docker needs "
                 "prefect-docker; kubernetes uses infra/k8s/)")
    template = worker.get_default_base_job_template()
    if pool_type == "docker":
        template["variables"]["properties"]["command"]["default"] = ENGINE
    return template


with get_client(sync_client=True) as client:
    for name, pool_type in (p.split("=", 1) for p in pools):
        try:
            pool = client.read_work_pool(name)
            note = "" if pool.type == pool_type else f"; not {pool_type}: delete it to change its type"
            print(f"work pool {name} ({pool.type}) exists{note}")
        except ObjectNotFound:
            template = base_job_template(name, pool_type)
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
            print(f"work pool {name} ({pool_type}) created")
    # One train per GPU: however the pool runs its jobs, at most LORAFORGE_GPUS of them at once.
    client.update_work_pool("loraforge-gpu", WorkPoolUpdate(concurrency_limit=int(gpus)))
    print(f"work pool loraforge-gpu: concurrency limit {gpus}")
PYEOF

"$PY" -m prefect --no-prompt deploy --all --prefect-file "$PREFECT_FILE"
