"""The pipeline config and helpers the integration tests share (fixtures are in tests/integration/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from loraforge.tasks.artifacts import Artifact, ArtifactStore
from loraforge.tasks.config import DEMO_CONFIG, PipelineConfig, load_config

TOKEN = "hf_test_token_0123456789"
REPO = "loraforge/tiny-ticket-router"


def _config(tiny_model: Path, workdir: Path, hub: str, *extra: str) -> PipelineConfig:
    return load_config(DEMO_CONFIG, [
        f"base_model={tiny_model}", f"store={workdir / 'store'}", "name=tiny-router",
        "eval.gate=[loss_delta < 0]", "eval.max_rows=32", "quantize.probe_rows=4", "merge.probe_rows=4",
        "quantize.fidelity_rows=4", f"publish.endpoint={hub}", f"publish.repo_id={REPO}", "publish.push=always",
        *extra,
    ])  # fmt: skip


def _run(config: PipelineConfig) -> dict:
    from loraforge.flows.pipeline import pipeline

    return pipeline(config)


def _ran(record: dict) -> set[str]:
    return {stage for stage, info in record["stages"].items() if not info["cached"]}


def task_run_states(flow_run_id: str) -> dict[str, str]:
    """The state name of each task run of a flow run, by task name (e.g. {"train": "Cached"}), from Prefect's API."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> dict[str, str]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {run.name.rsplit("-", 1)[0]: str(run.state_name) for run in runs}

    return asyncio.run(read())


def copy_stages(first_run: dict, target: Path, *stages: str) -> tuple[ArtifactStore, dict[str, Artifact]]:
    """Copy the first run's artifacts of these stages into a store of their own (to damage them safely)."""
    for stage in stages:
        source = Path(first_run["stages"][stage]["path"])
        shutil.copytree(source, target / stage / source.name)
    store = ArtifactStore(target)
    return store, {stage: store.get(stage, first_run["stages"][stage]["key"]) for stage in stages}
