#!/usr/bin/env bash
# Create loraforge's work pools (if missing) and deploy every deployment in infra/prefect.yaml.
#   bash infra/stack/deploy.sh            (make deploy; make stack runs it too)
# Needs PREFECT_API_URL. Settings, all with defaults (see the header of infra/prefect.yaml):
#   LORAFORGE_POOL_TYPE     process (default: workers run stages as processes from LORAFORGE_CODE_DIR) or docker
#   LORAFORGE_CODE_DIR      where the project is on the workers       (default: this checkout)
#   LORAFORGE_CONFIG        config of the scheduled/triggered runs    (default: flows/configs/demo.yaml)
#   LORAFORGE_STORE         the artifact store all workers share      (default: ./artifacts, absolute)
#   LORAFORGE_IMAGE_PREFIX / LORAFORGE_IMAGE_TAG   stage images       (default: localhost/ and the git sha)
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

"$PY" - "$POOL_TYPE" loraforge-cpu loraforge-gpu <<'PYEOF'
import sys

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.workers.base import BaseWorker

pool_type, *names = sys.argv[1:]
worker = BaseWorker.get_worker_class_from_type(pool_type)
if worker is None:
    sys.exit(f"deploy: no Prefect worker type {pool_type!r} installed (process is built in; docker needs prefect-docker)")
with get_client(sync_client=True) as client:
    for name in names:
        try:
            pool = client.read_work_pool(name)
            print(f"work pool {name} ({pool.type}) exists")
        except ObjectNotFound:
            template = worker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
            print(f"work pool {name} ({pool_type}) created")
PYEOF

"$PY" -m prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml
