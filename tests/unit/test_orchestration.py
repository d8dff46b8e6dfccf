"""The orchestration switch, the deployments file and register-data, without a server (the server-side behaviour
is in tests/integration/test_deployments.py)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from loraforge.flows.cli import main
from loraforge.flows.pipeline import DEPLOYMENTS, IN_PROCESS, pipeline
from loraforge.flows.stages import STAGE_FLOWS
from loraforge.tasks.config import DEMO_CONFIG, load_config
from loraforge.tasks.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No Prefect server configured: neither in the environment nor in the settings context (a test harness)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_orchestration_options_are_validated() -> None:
    config = load_config(DEMO_CONFIG)
    assert config.orchestration.stages == "in_process" and config.orchestration.approval is False
    with pytest.raises(ConfigError) as error:
        load_config(DEMO_CONFIG, ["orchestration.stages=remote", "orchestration.approval_timeout_s=0"])
    message = str(error.value)
    assert "orchestration.stages" in message and "'in_process' or 'deployments'" in message
    assert "orchestration.approval_timeout_s" in message and "2 problems" in message


@pytest.mark.parametrize("override", ["orchestration.stages=deployments", "orchestration.approval=true"])
def test_deployments_and_approval_need_a_prefect_server(override: str, no_server: None, tmp_path: Path) -> None:
    config = load_config(DEMO_CONFIG, [override, f"store={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"{override} needs a Prefect server"):
        pipeline.fn(config)
    assert not (tmp_path / "base").exists()  # refused before any stage ran


def test_every_stage_has_a_flow_and_a_deployment_in_prefect_yaml() -> None:
    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {*IN_PROCESS, "pipeline"} == {*STAGE_FLOWS, "pipeline"}
    for stage, stage_flow in STAGE_FLOWS.items():
        d = deployments[stage]
        assert d["entrypoint"] == f"flows/stages.py:{stage_flow.fn.__name__}"
        assert DEPLOYMENTS[stage] == f"{stage_flow.name}/{d['name']}"
        # The pipeline passes the upstream keys as `inputs`: the flow takes them and nothing per stage.
        assert list(inspect.signature(stage_flow.fn).parameters) == ["config", "inputs", "only"]
        assert stage_flow.name == f"loraforge-{stage}" and stage_flow.fn.__doc__
        assert d["work_pool"]["name"] == ("loraforge-gpu" if stage == "train" else "loraforge-cpu")
    pipeline_deployment = deployments["pipeline"]
    assert pipeline_deployment["entrypoint"] == "flows/pipeline.py:run_pipeline"
    assert [s["cron"] for s in pipeline_deployment["schedules"]] == ["0 2 * * *"]
    (trigger,) = pipeline_deployment["triggers"]
    assert trigger["expect"] == ["loraforge.data.registered"]
    assert trigger["parameters"] == {"data_file": "{{ event.payload.path }}"}


def test_the_gpu_train_deployment_runs_the_cuda_image_with_every_gpu() -> None:
    """The train deployment (loraforge-gpu pool) takes the CUDA build of the train image (`<tag>-cuda`, from
    `containers/build.sh train-cuda`) and asks a Docker engine for every NVIDIA GPU; every other stage runs its
    CPU image with no device request."""
    from docker.types import DeviceRequest, HostConfig

    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    train = deployments["train"]["work_pool"]
    assert train["name"] == "loraforge-gpu"
    assert train["job_variables"]["image"] == (
        "{{ $LORAFORGE_IMAGE_PREFIX }}loraforge-train:{{ $LORAFORGE_IMAGE_TAG }}-cuda"
    )
    requests = train["job_variables"]["container_create_kwargs"]["device_requests"]
    # What Prefect's Docker worker hands docker-py (containers.create(**container_create_kwargs)): the engine's
    # DeviceRequests of `docker run --gpus all`.
    host = HostConfig(version="1.41", device_requests=requests)
    assert host["DeviceRequests"] == [DeviceRequest(driver="nvidia", count=-1, capabilities=[["gpu"]])]
    for name, d in deployments.items():
        if name != "train":
            assert not d["work_pool"]["job_variables"]["image"].endswith("-cuda"), name
            assert "container_create_kwargs" not in d["work_pool"]["job_variables"], name


def test_deploy_refuses_a_bad_nightly_setting_and_a_missing_prefect_file() -> None:
    import os
    import subprocess

    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "LORAFORGE_NIGHTLY": "sometimes"}
    result = subprocess.run(["bash", "infra/stack/deploy.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "deploy: LORAFORGE_NIGHTLY must be on or off, got 'sometimes'"

    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "LORAFORGE_PREFECT_FILE": "infra/nope.yaml"}
    result = subprocess.run(["bash", "infra/stack/deploy.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "deploy: LORAFORGE_PREFECT_FILE: no file infra/nope.yaml"
        " (give the path of a prefect.yaml, e.g. infra/prefect.yaml)"
    )


def test_register_data_refuses_a_missing_file_and_a_missing_server(
    tmp_path: Path, no_server: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["register-data", str(tmp_path / "nope.jsonl")]) == 1
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert main(["register-data", str(tmp_path / "notes.txt")]) == 1
    assert "is not a .jsonl/.json/.csv/.parquet file" in capsys.readouterr().err
    (tmp_path / "new.jsonl").write_text("{}\n")
    assert main(["register-data", str(tmp_path / "new.jsonl")]) == 1
    assert "set PREFECT_API_URL" in capsys.readouterr().err
