"""infra/prefect.yaml against a real `prefect server start` on PostgreSQL (this module's own, `postgres_api`):
deployed with `prefect deploy --all` (through infra/stack/deploy.sh, process work pools), the nightly schedule
computed by the server, the data-registered trigger producing a run, the pipeline running every stage on its own
deployment through real process workers with the keys of an in-process run, and the approval pause before
publish, resumed and refused."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hub import stop

from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.config import DEMO_CONFIG, load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("base", "data", "train", "eval", "merge", "quantize", "publish")
# The smallest pipeline that still runs every stage for real on the tiny model.
TINY = ["eval.gate=[loss_delta < 0]", "eval.max_rows=4", "data.max_rows=32", "train.max_steps=2",
        "quantize.types=[q8_0]", "quantize.probe_rows=1", "quantize.fidelity_rows=1", "merge.probe_rows=1",
        "publish.include_gguf=[q8_0]", "publish.push=never"]  # fmt: skip


@dataclass
class Server:
    api: str
    env: dict[str, str]
    home: Path

    def client(self) -> Any:
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api}):
            yield


def wait_for(what: str, probe: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(1)
    return found


@pytest.fixture(scope="module")
def postgres_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prefect server of this module's own on PostgreSQL (tests/hub.py says why not the session's SQLite server:
    two workers poll it every second), its scheduler looping every second."""
    from hub import prefect_server_on_postgres

    home = tmp_path_factory.mktemp("prefect-postgres")
    with prefect_server_on_postgres(home, {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}) as api:
        yield api


@pytest.fixture(scope="module")
def server(postgres_api: str, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """This module's Prefect server with everything in infra/prefect.yaml deployed, the nightly schedule switched
    off (LORAFORGE_NIGHTLY=off: a run at 02:00 UTC would otherwise start the real pipeline on this module's
    workers, beside the runs the tests count)."""
    home = tmp_path_factory.mktemp("prefect-deployments")
    env = {**os.environ, "PREFECT_API_URL": postgres_api, "PREFECT_HOME": str(home / "client"),
           "PREFECT_WORKER_QUERY_SECONDS": "1",
           "LORAFORGE_CODE_DIR": str(ROOT), "LORAFORGE_CONFIG": str(DEMO_CONFIG),
           "LORAFORGE_STORE": str(home / "nightly-store"), "LORAFORGE_IMAGE_TAG": "test",
           "LORAFORGE_NIGHTLY": "off", "PYTHON": sys.executable}  # fmt: skip
    deploy = subprocess.run(["bash", "infra/stack/deploy.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    return Server(postgres_api, env, home)


@pytest.fixture(scope="module")
def workers(server: Server) -> Iterator[None]:
    """One real `prefect worker start --type process` per work pool (CPU and GPU), first needed by the deployed
    pipeline's test: the tests that need no worker run before it (no polling beside them), except the
    cancelled-stage test, whose abandoned run would count among the deployed pipeline's stage runs."""
    processes = []
    for pool in ("loraforge-cpu", "loraforge-gpu"):
        log = (server.home / f"worker-{pool}.log").open("w")
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
        processes.append(subprocess.Popen(cmd, cwd=ROOT, env=server.env, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield
    finally:
        stop(*processes)


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny pipeline run in-process (the session's Prefect harness): the keys to compare against."""
    from loraforge.flows.pipeline import pipeline

    store = tmp_path_factory.mktemp("in-process") / "store"
    return pipeline(load_config(DEMO_CONFIG, [f"base_model={tiny_model}", f"store={store}", *TINY]))


def deployment(server: Server, name: str) -> Any:
    with server.settings(), server.client() as client:
        return client.read_deployment_by_name(name)


def test_every_deployment_resolves_to_its_flow_and_pool(server: Server) -> None:
    from prefect.flows import load_flow_from_entrypoint

    with server.settings(), server.client() as client:
        deployments = {f"{d.entrypoint}": d for d in client.read_deployments()}
    stage_flows = {f"flows/stages.py:{s}_flow": s for s in STAGES}
    assert set(deployments) == {*stage_flows, "flows/pipeline.py:run_pipeline"}
    for entrypoint, d in deployments.items():
        flow = load_flow_from_entrypoint(str(ROOT / entrypoint))
        stage = stage_flows.get(entrypoint, "pipeline")
        assert d.name == stage and flow.name == ("loraforge-run" if stage == "pipeline" else f"loraforge-{stage}")
        assert d.work_pool_name == ("loraforge-gpu" if stage == "train" else "loraforge-cpu")
        image = (
            "loraforge-publish"
            if stage == "pipeline"
            else "loraforge-data"
            if stage == "base"
            else f"loraforge-{stage}"
        )
        assert d.job_variables["image"] == f"localhost/{image}:{'test-cuda' if stage == 'train' else 'test'}"
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    gpu = deployments["flows/stages.py:train_flow"].job_variables["container_create_kwargs"]["device_requests"]
    assert gpu == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]


def test_nightly_schedule_is_computed_by_the_server(server: Server) -> None:
    import datetime as dt

    import yaml
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.objects import StateType

    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    (nightly,) = [d["schedules"] for d in spec["deployments"] if d["name"] == "pipeline"]
    assert nightly == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]  # what `make deploy` deploys
    pipeline = deployment(server, "loraforge-run/pipeline")
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in pipeline.schedules] == [
        ("0 2 * * *", "UTC", False)  # LORAFORGE_NIGHTLY=off: deployed switched off
    ]

    def scheduled() -> list:
        with server.settings(), server.client() as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[pipeline.id])))
        return [r for r in runs if r.state_type == StateType.SCHEDULED and "data_file" not in r.parameters]

    assert not scheduled()
    pools = ("loraforge-cpu", "loraforge-gpu")
    with server.settings(), server.client() as client:
        for pool in pools:  # switched on for this check alone: no worker may take a run that falls due meanwhile
            client.update_work_pool(pool, WorkPoolUpdate(is_paused=True))
        client.update_deployment_schedule(pipeline.id, pipeline.schedules[0].id, active=True)
    try:
        runs = wait_for("the nightly runs", lambda: runs if len(runs := scheduled()) >= 3 else None, 60)
        starts = sorted(r.expected_start_time.astimezone(dt.UTC) for r in runs)
        now = dt.datetime.now(dt.UTC)
        assert all((t.hour, t.minute, t.second) == (2, 0, 0) for t in starts), starts
        assert now < starts[0] <= now + dt.timedelta(days=1)
        assert [b - a for a, b in zip(starts, starts[1:], strict=False)] == [dt.timedelta(days=1)] * (len(starts) - 1)
        assert runs[0].parameters["overrides"][0] == "orchestration.stages=deployments"
    finally:
        with server.settings(), server.client() as client:
            client.update_deployment_schedule(pipeline.id, pipeline.schedules[0].id, active=False)
        try:
            wait_for("the server to drop the scheduled runs", lambda: not scheduled(), 90)
        finally:  # a failure here must not leave the pools paused: the deployed pipeline's test would wait 1200 s
            with server.settings(), server.client() as client:
                for pool in pools:
                    client.update_work_pool(pool, WorkPoolUpdate(is_paused=False))


def test_registering_data_triggers_a_pipeline_run(server: Server, tmp_path: Path) -> None:
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    pipeline = deployment(server, "loraforge-run/pipeline")
    data = tmp_path / "new-tickets.jsonl"
    data.write_text((DEMO_CONFIG.parent.parent / "data" / "tickets" / "train.jsonl").read_text())
    with server.settings(), server.client() as client:
        # The triggered run is the real (SmolLM2) pipeline: keep any worker from taking it.
        client.update_work_pool("loraforge-cpu", WorkPoolUpdate(is_paused=True))
    try:
        missing = str(tmp_path / "missing.jsonl")
        bad = subprocess.run([sys.executable, "-m", "loraforge.flows.cli", "register-data", missing],
                             cwd=ROOT, env=server.env, capture_output=True, text=True)  # fmt: skip
        assert bad.returncode == 1 and "missing.jsonl does not exist" in bad.stderr, bad.stderr[-2000:]
        cmd = [sys.executable, "-m", "loraforge.flows.cli", "register-data", str(data)]
        result = subprocess.run(cmd, cwd=ROOT, env=server.env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

        def triggered() -> list:
            with server.settings(), server.client() as client:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[pipeline.id]))
                )
            return [r for r in runs if r.parameters.get("data_file") == str(data)]

        (run,) = wait_for("the trigger's flow run", triggered, 60)
        assert run.parameters["overrides"] == ["orchestration.stages=deployments", f"store={server.home}/nightly-store"]
        assert run.created_by is not None and run.created_by.type == "AUTOMATION"
        with server.settings(), server.client() as client:
            client.delete_flow_run(run.id)
    finally:
        with server.settings(), server.client() as client:
            client.update_work_pool("loraforge-cpu", WorkPoolUpdate(is_paused=False))


def run_cli_and_answer(server: Server, reference: dict, approve: bool, reason: str) -> subprocess.CompletedProcess:
    """`loraforge run` with the approval pause on (every stage a cache hit); answer the pause, wait for the end."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName
    from prefect.flow_runs import resume_flow_run

    base_model = reference["config"]["base_model"]
    cmd = [sys.executable, "-m", "loraforge.flows.cli", "run", str(DEMO_CONFIG), f"base_model={base_model}", *TINY,
           f"store={reference['store']}", "orchestration.approval=true"]  # fmt: skip
    with (server.home / f"approval-{approve}.log").open("w+") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, env=server.env, stdout=log, stderr=subprocess.STDOUT, text=True)
        paused = FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"])))

        def paused_runs() -> list:
            assert process.poll() is None, "the run ended without pausing"
            with server.settings(), server.client() as client:
                return client.read_flow_runs(flow_run_filter=paused)

        (run,) = wait_for("the approval pause", paused_runs, 300)
        assert run.state is not None and run.state.state_details.run_input_keyset, "the pause waits for no input"
        with server.settings():
            resume_flow_run(run.id, run_input={"approve": approve, "reason": reason})
        process.wait(timeout=300)
        log.seek(0)
        return subprocess.CompletedProcess(cmd, process.returncode, log.read(), "")


def test_approval_pause_before_publish(server: Server, reference: dict) -> None:
    approved = run_cli_and_answer(server, reference, approve=True, reason="numbers look right")
    assert approved.returncode == 0, approved.stdout[-3000:]
    assert "publish: bundle only" in approved.stdout
    record = ArtifactStore(reference["store"]).load_run("latest")
    assert {k: record["approval"][k] for k in ("approved", "reason")} == {
        "approved": True,
        "reason": "numbers look right",
    }
    keys = {s: record["stages"][s]["key"] for s in ("eval", "quantize")}
    approval = ArtifactStore(reference["store"]).root / "approvals" / f"{keys['eval']}-{keys['quantize']}.json"
    assert json.loads(approval.read_text())["flow_run_id"] == record["approval"]["flow_run_id"]  # what publish checked
    assert record["stages"]["publish"]["key"] == reference["stages"]["publish"]["key"]

    refused = run_cli_and_answer(server, reference, approve=False, reason="wait for the new data")
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert "publish not approved by the reviewer: wait for the new data" in refused.stdout
    assert "publish" not in ArtifactStore(reference["store"]).load_run("latest")["stages"]


@pytest.mark.timeout(1800)  # the deployed pipeline may take run_deployment's 1200 s, after the module's set-up
def test_pipeline_runs_each_stage_on_its_deployment(
    server: Server, workers: None, reference: dict, tiny_model: Path
) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment

    store = server.home / "deployed-store"
    overrides = [f"base_model={tiny_model}", *TINY, "orchestration.stages=deployments", f"store={store}"]
    with server.settings():
        parent = run_deployment("loraforge-run/pipeline", timeout=1200, poll_interval=2,
                                parameters={"config_path": str(DEMO_CONFIG), "overrides": overrides})  # fmt: skip
    assert parent.state is not None and parent.state.is_completed(), parent.state
    record = ArtifactStore(store).load_run("latest")
    assert {s: i["key"] for s, i in record["stages"].items()} == {s: i["key"] for s, i in reference["stages"].items()}
    assert set(record["stages"]) == set(STAGES)
    assert not any(i["cached"] for i in record["stages"].values())  # each stage computed on its own worker

    with server.settings(), server.client() as client:
        stage_of = {client.read_deployment_by_name(f"loraforge-{s}/{s}").id: s for s in STAGES}
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(stage_of))))
    deployed = {stage_of[r.deployment_id]: r for r in runs}
    assert len(runs) == len(STAGES) and all(r.parent_task_run_id for r in runs)  # one subflow run per stage
    assert set(deployed) == set(STAGES)
    for stage, run in deployed.items():
        assert run.state_name == "Completed"
        assert run.work_pool_name == ("loraforge-gpu" if stage == "train" else "loraforge-cpu")
        assert run.parameters["config"]["store"] == store.resolve().as_uri()
    # Created with an idempotency key (the pipeline's flow run, its attempt, the stage, its parameters): a create
    # request the client retries after a timeout gets this run back instead of a second run of the stage.
    keys = [r.idempotency_key.split(".") for r in deployed.values() if r.idempotency_key]
    assert sorted(k[2] for k in keys) == sorted(STAGES), keys
    assert len({(k[0], k[1]) for k in keys}) == 1 and keys[0][1] == "1", keys  # one pipeline run, first attempt


def test_a_stage_given_up_on_is_cancelled(server: Server, tiny_model: Path, tmp_path: Path) -> None:
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from loraforge.flows.pipeline import pipeline
    from loraforge.tasks.errors import StageError

    config = load_config(DEMO_CONFIG, [f"base_model={tiny_model}", *TINY, "orchestration.stages=deployments",
                                       "orchestration.stage_timeout_s=3", f"store={tmp_path / 'store'}"])  # fmt: skip
    with server.settings(), server.client() as client:
        client.update_work_pool("loraforge-cpu", WorkPoolUpdate(is_paused=True))  # nobody takes the base stage
    try:
        with server.settings(), pytest.raises(StageError, match=r"base stage: flow run .* was cancelled"):
            pipeline(config)
        base = deployment(server, "loraforge-base/base")

        def cancelled() -> list:
            with server.settings(), server.client() as client:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[base.id])))
            return [r for r in runs if r.state_name in ("Cancelling", "Cancelled")]

        wait_for("the abandoned stage run to be cancelled", cancelled, 30)
    finally:
        with server.settings(), server.client() as client:
            client.update_work_pool("loraforge-cpu", WorkPoolUpdate(is_paused=False))
