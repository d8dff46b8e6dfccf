"""The Kubernetes work pools (infra/k8s/*.json, made by infra/k8s/pool.py) without a cluster: the Job manifest
prefect-kubernetes' own worker code renders for a flow run of each deployment in infra/prefect.yaml is checked
against the Kubernetes API models (kubernetes.client.V1Job: types, required fields, no unknown field).

What this does not show: that a cluster schedules it (GPU nodes, the secret, the image pull); see
docs/operations.md, "## Kubernetes"."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENV = {"LORAFORGE_IMAGE_PREFIX": "registry.example.com/acme/", "LORAFORGE_IMAGE_TAG": "0123abcd4567",
       "LORAFORGE_CODE_DIR": "/opt/loraforge", "LORAFORGE_CONFIG": "flows/configs/demo.yaml",
       "LORAFORGE_STORE": "s3://bucket/loraforge"}  # fmt: skip
CPU_DEPLOYMENTS = ("base", "data", "eval", "merge", "quantize", "publish", "pipeline")


def _load_pool() -> ModuleType:
    """infra/k8s/pool.py (infra/ is not a package) imported as the module `loraforge_k8s_pool`."""
    spec = importlib.util.spec_from_file_location("loraforge_k8s_pool", ROOT / "infra" / "k8s" / "pool.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pool = _load_pool()


@pytest.fixture
def deploy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deploy-time environment `prefect deploy` (make deploy) would read."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def template(kind: str) -> dict[str, Any]:
    """The committed template file of the `kind` pool, as `prefect work-pool create --base-job-template` reads it."""
    return json.loads(pool.TEMPLATES[kind].read_text())


def render(kind: str, deployment: str, **job_variables: Any) -> dict[str, Any]:
    """The Job manifest for a flow run of `deployment` on the `kind` pool, with extra deployment job variables."""
    config = pool.deployment_config(deployment)
    config["work_pool"]["job_variables"] = {**config["work_pool"].get("job_variables", {}), **job_variables}
    return pool.render_job_manifest(template(kind), config)


def expected_problems() -> list[str]:
    """What the models find in every manifest prefect-kubernetes renders (see PREFECT_KUBERNETES_EXTRA_FIELDS)."""
    return [f"{path}: unknown field" for path in pool.PREFECT_KUBERNETES_EXTRA_FIELDS]


def v1_job(manifest: dict[str, Any]) -> Any:
    """The manifest as the typed kubernetes.client.V1Job."""
    from kubernetes.client import V1Job

    return V1Job.from_dict(manifest)


@pytest.mark.parametrize("kind", ["gpu", "cpu"], ids=["gpu-pool", "cpu-pool"])  # an id "gpu" = the gpu marker
def test_templates_are_prefect_kubernetes_default_plus_loraforge(kind: str) -> None:
    from prefect_kubernetes.worker import KubernetesWorker

    assert pool.TEMPLATES[kind].read_text() == pool.template_text(kind), "regenerate: python infra/k8s/pool.py write"
    default = KubernetesWorker.get_default_base_job_template()
    ours = template(kind)
    assert ours["job_configuration"].keys() == default["job_configuration"].keys()
    assert set(default["variables"]["properties"]) - set(ours["variables"]["properties"]) == {"backoff_limit"}


def test_gpu_train_job_is_a_valid_kubernetes_job(deploy_env: None) -> None:
    manifest = render("gpu", "train")
    assert pool.manifest_problems(manifest) == expected_problems()
    job = v1_job(manifest)
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == "registry.example.com/acme/loraforge-train:0123abcd4567-cuda"
    assert container.resources.limits["nvidia.com/gpu"] == container.resources.requests["nvidia.com/gpu"] == "1"
    assert (container.resources.requests["cpu"], container.resources.limits["memory"]) == ("4", "32Gi")
    assert [e.secret_ref.name for e in container.env_from] == ["loraforge-store"]
    env = {e.name: e.value for e in container.env}
    assert env["PREFECT__FLOW_RUN_ID"] == manifest["metadata"]["labels"]["prefect.io/flow-run-id"]
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"  # Prefect's answer to backoffLimit 0
    assert not any(k.startswith(("AWS_", "LORAFORGE_STORE")) for k in env)  # the store settings come from the secret
    assert container.args == ["prefect", "flow-run", "execute"]  # the images' entrypoint runs it as is
    assert (pod.restart_policy, job.spec.backoff_limit, job.spec.ttl_seconds_after_finished) == ("Never", 0, 86400)
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert [(m.name, m.mount_path) for m in container.volume_mounts] == [("cache", "/cache")]
    assert [v.name for v in pod.volumes] == ["cache"] and pod.volumes[0].empty_dir is not None
    assert job.metadata.namespace == "loraforge" and job.metadata.generate_name == "k8s-render-"
    # The Docker pool's job variable in the same deployment is ignored here, not passed into the manifest.
    assert "device_requests" not in json.dumps(manifest)


def test_job_variables_set_gpus_resources_placement_and_secret(deploy_env: None) -> None:
    manifest = render("gpu", "train", gpus="4", cpu_limit="32", memory_limit="200Gi", store_secret="team-store",
                      node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, tolerations=[],
                      cache_volume={"name": "cache", "persistentVolumeClaim": {"claimName": "models"}})  # fmt: skip
    assert pool.manifest_problems(manifest) == expected_problems()
    pod = v1_job(manifest).spec.template.spec
    (container,) = pod.containers
    assert container.resources.limits == {"cpu": "32", "memory": "200Gi", "nvidia.com/gpu": "4"}
    assert container.resources.requests["nvidia.com/gpu"] == "4"
    assert container.env_from[0].secret_ref.name == "team-store"
    assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"} and pod.tolerations == []
    assert pod.volumes[0].persistent_volume_claim.claim_name == "models"


def test_job_variables_are_checked_against_the_pool_schema(deploy_env: None) -> None:
    """What the server checks on `prefect deploy` (prefect.server.api.validation): the train deployment's job
    variables fit the GPU pool; a GPU count given as a number does not (Kubernetes quantities are strings in the
    API models: an int `nvidia.com/gpu` is a type error there too, see the broken manifests below)."""
    from prefect.utilities.schema_tools import validate

    schema = template("gpu")["variables"]
    train = pool.deployment_config("train")["work_pool"]["job_variables"]
    options = {"preprocess": True, "ignore_required": True, "allow_none_with_default": True}
    assert validate(train, schema, **options) == []
    errors = validate({**train, "gpus": 2}, schema, **options)
    assert [e.path[0] for e in errors] == ["gpus"]
    assert [e.path[0] for e in validate({"gpus": "0"}, schema, **options)] == ["gpus"]


@pytest.mark.parametrize("deployment", CPU_DEPLOYMENTS)
def test_every_other_stage_is_a_valid_job_on_the_cpu_pool(deployment: str, deploy_env: None) -> None:
    manifest = render("cpu", deployment)
    assert pool.manifest_problems(manifest) == expected_problems()
    (container,) = v1_job(manifest).spec.template.spec.containers
    image = {"base": "loraforge-data", "pipeline": "loraforge-publish"}.get(deployment, f"loraforge-{deployment}")
    assert container.image == f"registry.example.com/acme/{image}:0123abcd4567"
    assert "nvidia.com/gpu" not in container.resources.limits and container.env_from[0].secret_ref.name


def test_worker_manifests_are_valid_and_bound_to_the_role() -> None:
    """infra/k8s/worker.yaml (what `kubectl apply` would send): every object a valid Kubernetes object, the worker's
    service account bound to a Role that may manage Jobs and read Pods and logs, in the pool's namespace."""
    docs = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "worker.yaml").read_text()))
    assert {d["kind"]: pool.manifest_problems(d, f"V1{d['kind']}") for d in docs} == {
        "ServiceAccount": [], "Role": [], "RoleBinding": [], "Deployment": []
    }  # fmt: skip
    objects = {d["kind"]: d for d in docs}
    assert {d["metadata"]["namespace"] for d in docs} == {
        template("gpu")["variables"]["properties"]["namespace"]["default"]
    }
    rules = {(r["apiGroups"][0], res): set(r["verbs"]) for r in objects["Role"]["rules"] for res in r["resources"]}
    assert {"create", "get", "watch", "delete"} <= rules[("batch", "jobs")] and "get" in rules[("", "pods/log")]
    (subject,) = objects["RoleBinding"]["subjects"]
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert subject["name"] == objects["ServiceAccount"]["metadata"]["name"] == pod["serviceAccountName"]
    args = pod["containers"][0]["args"]
    assert args[:3] == ["prefect", "worker", "start"] and args[args.index("--pool") + 1] == "loraforge-gpu"
    assert "--type" in args and args[args.index("--type") + 1] == "kubernetes"


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    return _pod(manifest)["containers"][0]


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "misspelled field": (
        lambda m: _container(m).update(envfrom=_container(m).pop("envFrom")),
        "spec.template.spec.containers.0.envfrom: unknown field",
    ),
    "misspelled nested field": (
        lambda m: _container(m)["envFrom"][0].update(secretref=_container(m)["envFrom"][0].pop("secretRef")),
        "spec.template.spec.containers.0.envFrom.0.secretref: unknown field",
    ),
    "field at the wrong level": (
        lambda m: _pod(m).update(ttlSecondsAfterFinished=m["spec"].pop("ttlSecondsAfterFinished")),
        "spec.template.spec.ttlSecondsAfterFinished: unknown field",  # a Job field put in the pod spec
    ),
    "wrong type": (lambda m: m["spec"].update(backoffLimit="0"), "V1JobSpec.backoffLimit: Input should be a valid int"),
    "number as a quantity": (
        lambda m: _container(m)["resources"]["limits"].update({"nvidia.com/gpu": 1}),
        "V1ResourceRequirements.limits.nvidia.com/gpu: Input should be a valid string",
    ),
    "missing required field": (
        lambda m: _container(m).pop("name"),
        "V1Container.name: Input should be a valid string (given None)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("breakage", BROKEN)
def test_the_validator_catches_a_broken_manifest(breakage: str, deploy_env: None) -> None:
    manifest = render("gpu", "train")
    broken = copy.deepcopy(manifest)
    breaks, problem = BROKEN[breakage]
    breaks(broken)
    problems = pool.manifest_problems(broken)
    assert any(p.startswith(problem) for p in problems), problems
    assert pool.manifest_problems(manifest) == expected_problems()  # the good one, untouched, still passes


def test_manifest_command_prints_the_train_job(deploy_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert pool.main(["manifest"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-cuda") and not err
    assert pool.main(["manifest", "nope"]) == 2
    assert "no deployment 'nope'" in capsys.readouterr().err
