"""loraforge's Kubernetes work pools: the base job templates (infra/k8s/gpu-pool.json for the train stage,
infra/k8s/cpu-pool.json for the others), derived from prefect-kubernetes' own default template, and the Job
manifest a Kubernetes worker would create for a flow run of a deployment in infra/prefect.yaml, rendered with
prefect-kubernetes' own code and checked against the Kubernetes API models.

    python infra/k8s/pool.py write              # regenerate the two JSON files (after a prefect-kubernetes upgrade)
    python infra/k8s/pool.py manifest [NAME]    # the Job for a made-up flow run of deployment NAME (default train)

Operations (secret, pool, worker, RBAC): docs/operations.md, "## Kubernetes".
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, cast

import yaml

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "infra" / "prefect.yaml"
TEMPLATES = {"gpu": ROOT / "infra" / "k8s" / "gpu-pool.json", "cpu": ROOT / "infra" / "k8s" / "cpu-pool.json"}
# LORAFORGE_CACHE in every loraforge image (containers/base.Containerfile): base models are downloaded there.
CACHE_DIR = "/cache"
# prefect-kubernetes requires these two in the *pod* spec (its manifest check compares against a base manifest
# holding them there), where Kubernetes has no such fields: the API server drops them with a warning
# (`kubectl apply` of a rendered manifest needs --validate=warn). Every other unknown field is a mistake.
PREFECT_KUBERNETES_EXTRA_FIELDS = ("spec.template.spec.completions", "spec.template.spec.parallelism")


def _variable(title: str, schema: dict[str, Any], default: Any, description: str) -> dict[str, Any]:
    """A job variable in the form prefect-kubernetes' own variables have (shown as a form in Prefect's UI)."""
    return {"title": title, **schema, "default": default, "description": description}


STORE_SECRET_HELP = (
    "Kubernetes Secret (same namespace) loaded as the job's environment (envFrom): LORAFORGE_STORE "
    "(s3://bucket/prefix), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION."
)
NODE_SELECTOR_HELP = 'Node labels the pod must match, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}.'
CACHE_VOLUME_HELP = (
    f"The Kubernetes volume mounted at {CACHE_DIR} (LORAFORGE_CACHE: downloaded base models). Keep the name "
    'cache; e.g. {"name": "cache", "persistentVolumeClaim": {"claimName": "models"}} (a PVC named models).'
)
GPUS_HELP = (
    "NVIDIA GPUs per job: the nvidia.com/gpu request and limit (a count as a string, as Kubernetes quantities "
    "are). The pool's concurrency limit (deploy.sh: LORAFORGE_GPUS) counts jobs, not GPUs."
)
TOLERATIONS_HELP = "Pod tolerations; by default the nvidia.com/gpu taint GPU node pools commonly carry."
EMPTY_CACHE = {"name": "cache", "emptyDir": {}}  # the pod's own scratch space: a download per job
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _loraforge_variables(gpu: bool) -> dict[str, dict[str, Any]]:
    """The job variables loraforge adds to prefect-kubernetes' (whose names and forms stay as they are)."""
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    variables = {
        "store_secret": _variable("Artifact store secret", {"type": "string"}, "loraforge-store", STORE_SECRET_HELP),
        "node_selector": _variable("Node selector", strings, {}, NODE_SELECTOR_HELP),
        "cache_volume": _variable("Model cache volume", {"type": "object"}, EMPTY_CACHE, CACHE_VOLUME_HELP),
    }
    if gpu:
        count = {"type": "string", "pattern": "^[1-9][0-9]*$"}
        variables["gpus"] = _variable("GPUs", count, "1", GPUS_HELP)
        objects = {"type": "array", "items": {"type": "object"}}
        variables["tolerations"] = _variable("Tolerations", objects, [GPU_TAINT], TOLERATIONS_HELP)
    return variables


# Resource defaults (prefect-kubernetes leaves them unset): a train job loads the base model in host memory first.
RESOURCES = {
    "gpu": {"cpu_request": "4", "cpu_limit": "8", "memory_request": "32Gi", "memory_limit": "32Gi"},
    "cpu": {"cpu_request": "2", "cpu_limit": "4", "memory_request": "16Gi", "memory_limit": "16Gi"},
}


def pool_template(kind: str) -> dict[str, Any]:
    """The base job template of loraforge's `kind` ("gpu" or "cpu") Kubernetes pool.

    prefect-kubernetes' default template, plus: the artifact-store secret as the container's environment, the
    model cache volume, a node selector, resource defaults, `backoffLimit: 0` fixed (Prefect retries and
    reschedules evicted runs; Kubernetes must not start the run again), finished jobs kept a day; for "gpu",
    `nvidia.com/gpu` requested and limited (`gpus`, 1) and the GPU taint tolerated.
    """
    from prefect_kubernetes.worker import KubernetesWorker

    gpu = kind == "gpu"
    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    props = template["variables"]["properties"]
    del props["backoff_limit"]
    props["namespace"]["default"] = "loraforge"
    props["finished_job_ttl"]["default"] = 24 * 3600
    for name, default in RESOURCES[kind].items():
        props[name]["default"] = default
    props.update(_loraforge_variables(gpu))

    job = template["job_configuration"]["job_manifest"]
    job["spec"]["backoffLimit"] = 0
    pod = job["spec"]["template"]["spec"]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["volumes"] = ["{{ cache_volume }}"]
    container = pod["containers"][0]
    container["envFrom"] = [{"secretRef": {"name": "{{ store_secret }}"}}]
    container["volumeMounts"] = [{"name": "cache", "mountPath": CACHE_DIR}]
    if gpu:
        pod["tolerations"] = "{{ tolerations }}"
        for bound in ("limits", "requests"):
            container["resources"][bound]["nvidia.com/gpu"] = "{{ gpus }}"
    return template


def template_text(kind: str) -> str:
    """pool_template(kind) as the JSON file holds it."""
    return json.dumps(pool_template(kind), indent=2) + "\n"


def deployment_config(name: str, prefect_file: Path = PREFECT_YAML) -> dict[str, Any]:
    """Deployment `name` of prefect_file with `{{ $ENV }}` placeholders filled from os.environ, as `prefect deploy`
    does (prefect.cli.deploy: apply_values(deploy_config, os.environ, remove_notset=False))."""
    from prefect.utilities.templating import apply_values

    deployments = {d["name"]: d for d in yaml.safe_load(prefect_file.read_text())["deployments"]}
    if name not in deployments:
        raise KeyError(f"no deployment {name!r} in {prefect_file}; there are {sorted(deployments)}")
    return cast(dict[str, Any], apply_values(deployments[name], dict(os.environ), remove_notset=False))


class _FlowOnlyClient:
    """Stands in for the worker's Prefect client, which the worker asks for nothing but the run's flow here (the
    templates hold no block or variable references): any other call fails instead of reaching a server."""

    def __init__(self, flow: Any) -> None:
        self.flow = flow

    async def read_flow(self, flow_id: uuid.UUID) -> Any:
        """The flow of the rendered run."""
        assert flow_id == self.flow.id, f"asked for flow {flow_id}, rendering a run of {self.flow.id}"
        return self.flow

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"rendering a job manifest needs no Prefect server, but the worker called {name}")


async def _job_manifest(template: dict[str, Any], deployment: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest prefect-kubernetes' worker would submit for a new flow run of `deployment`."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    pool_name = deployment["work_pool"]["name"]
    pool = WorkPool(name=pool_name, type="kubernetes", base_job_template=template, default_queue_id=uuid.uuid4())
    flow = Flow(id=uuid.uuid4(), name=f"loraforge-{deployment['name']}", labels={})
    api = DeploymentResponse(id=uuid.uuid4(), name=deployment["name"], flow_id=flow.id, work_pool_name=pool_name,
                             job_variables=deployment["work_pool"].get("job_variables") or {}, labels={})  # fmt: skip
    run = FlowRun(id=uuid.uuid4(), name="k8s-render", flow_id=flow.id, deployment_id=api.id, work_pool_name=pool_name)
    client = cast(PrefectClient, _FlowOnlyClient(flow))
    config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
        run, client=client, work_pool=pool, worker_name="k8s-render", deployment=api
    )
    return config.job_manifest


def render_job_manifest(template: dict[str, Any], deployment: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest for a flow run of `deployment` (a deployment_config) on a pool with `template`.

    The worker's own step (BaseJobConfiguration.resolve_for_flow_run, as KubernetesWorker calls it for each run):
    the deployment's and run's job variables over the template (from_template_and_values), then
    prepare_for_flow_run (Prefect's environment, labels, command, job name, eviction handling).
    """
    return asyncio.run(_job_manifest(template, deployment))


def _differences(given: Any, kept: Any, path: str) -> list[str]:
    """Where `kept` (the manifest after a trip through the Kubernetes models) differs from `given`."""
    if isinstance(given, dict) and isinstance(kept, dict):
        found = [f"{path}{k}: unknown field" for k in given if k not in kept]
        return found + [d for k in given if k in kept for d in _differences(given[k], kept[k], f"{path}{k}.")]
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [d for i, (g, k) in enumerate(zip(given, kept, strict=True)) for d in _differences(g, k, f"{path}{i}.")]
    if given != kept or type(given) is not type(kept):
        return [f"{path.rstrip('.')}: {given!r} came back as {kept!r}"]
    return []


def manifest_problems(manifest: dict[str, Any], model: str = "V1Job") -> list[str]:
    """Everything the Kubernetes API models object to in `manifest`; [] when it is a valid `model` (a class of
    kubernetes.client: V1Job, V1Deployment, V1Role, ...).

    `model`.from_dict checks types and required fields (pydantic models, kubernetes>=35) but drops unknown keys
    silently; serializing back (ApiClient.sanitize_for_serialization) and comparing with the input finds those,
    and any value the models coerced. Paths are dotted (list items by index); a type or required-field error
    names the model it is in (`V1JobSpec.backoffLimit: ...`) and stops the check there.
    """
    import kubernetes.client
    from pydantic import ValidationError

    try:
        parsed = getattr(kubernetes.client, model).from_dict(manifest)
    except ValidationError as exc:
        # Each model validates its own fields: the location starts at the model named in exc.title.
        return [f"{exc.title}.{'.'.join(map(str, e['loc']))}: {e['msg']} (given {e['input']!r})" for e in exc.errors()]
    return _differences(manifest, kubernetes.client.ApiClient().sanitize_for_serialization(parsed), "")


def main(argv: list[str]) -> int:
    """`write`: regenerate the template files; `manifest [DEPLOYMENT]`: print the rendered Job (YAML) and any
    problem the Kubernetes models find (exit 1 on problems beyond PREFECT_KUBERNETES_EXTRA_FIELDS)."""
    if argv[:1] == ["write"]:
        for kind, path in TEMPLATES.items():
            path.write_text(template_text(kind))
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    if argv[:1] == ["manifest"] and len(argv) <= 2:
        try:
            deployment = deployment_config(argv[1] if len(argv) > 1 else "train")
        except KeyError as exc:
            print(f"pool.py manifest: {exc.args[0]}", file=sys.stderr)
            return 2
        kind = "gpu" if deployment["work_pool"]["name"] == "loraforge-gpu" else "cpu"
        manifest = render_job_manifest(json.loads(TEMPLATES[kind].read_text()), deployment)
        print(yaml.safe_dump(manifest, sort_keys=False), end="")
        problems = [p for p in manifest_problems(manifest) if p.split(":")[0] not in PREFECT_KUBERNETES_EXTRA_FIELDS]
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
