"""One thin Prefect flow per stage, for the per-stage deployments in infra/prefect.yaml.

Each flow takes the resolved pipeline config and the keys of its upstream artifacts, looks those artifacts up
in the shared store, calls the stage function and returns the key it produced (with whether it was a cache
hit). The pipeline flow (flows/pipeline.py) calls them through `run_deployment` when
`orchestration.stages: deployments`; a stage gives the same key and bytes in-process or here.

A stage's prints reach its flow run's logs (the Prefect UI); a run stops itself once it has run for
`orchestration.stage_timeout_s` (state TimedOut) and a cache hit ends `Cached` (flows/stage_runs.py).

Each flow also leaves its result in the store (`stage-runs/<flow run id>.json`), where the parent reads it:
workers share nothing but the store (a folder, or an s3:// bucket), not Prefect's result storage.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State

from flows.stage_runs import cached_state, within_stage_timeout
from tasks.artifacts import Artifact, ArtifactStore
from tasks.config import PipelineConfig
from tasks.data import prepare_data
from tasks.errors import StageError
from tasks.evaluate import evaluate_adapter
from tasks.merge import merge_adapter
from tasks.models import provision_base
from tasks.publish import publish_model
from tasks.quantize import quantize_gguf
from tasks.train import train_adapter

StageResult = dict[str, Any]  # {"stage": ..., "key": ..., "cached": bool}
StageOutcome = StageResult | State[StageResult]  # the result, or a `Cached` state holding it


def _store(config: PipelineConfig, only: str | None) -> ArtifactStore:
    """The shared store; with `only`, a view in which just that stage (and base) may write, as in-process."""
    store = ArtifactStore(config.store, config.store_verify)
    return store.restricted_to("base", only) if only is not None else store


def _base(config: PipelineConfig, store: ArtifactStore, key: str) -> Artifact:
    """The base model provisioned on this worker; it must be the one the pipeline started from."""
    base = provision_base(config.base_model, store)
    if base.key != key:
        raise StageError(
            f"base_model {config.base_model!r} on this worker has the key {base.key}, the pipeline started from "
            f"{key}: the workers see different weights; give every worker the same model files (or cache)."
        )
    return base


def _result(store: ArtifactStore, artifact: Artifact) -> StageOutcome:
    """The flow's result, also written to the store as `stage-runs/<flow run id>.json`: the pipeline reads it
    there, so workers need share nothing but the store (no Prefect result storage). A cache hit's run ends in a
    `Cached` state holding it (flows/stage_runs.py)."""
    from prefect.runtime import flow_run

    result = {"stage": artifact.stage, "key": artifact.key, "cached": artifact.cached}
    store.write_record(stage_run_record(str(flow_run.id)), result)
    return cached_state(artifact, result)


def stage_run_record(flow_run_id: str) -> str:
    """The store record where a stage flow run leaves its result."""
    return f"stage-runs/{flow_run_id}.json"


@flow(name="loraforge-base", persist_result=True, log_prints=True)
@within_stage_timeout
def base_flow(config: PipelineConfig, only: str | None = None) -> StageOutcome:
    """Provision the base model (`base_model`) and record it as the base artifact."""
    store = _store(config, only)
    return _result(store, provision_base(config.base_model, store))


@flow(name="loraforge-data", persist_result=True, log_prints=True)
@within_stage_timeout
def data_flow(config: PipelineConfig, base_key: str, only: str | None = None) -> StageOutcome:
    """The data stage: validate, template, tokenize and split the dataset."""
    store = _store(config, only)
    return _result(store, prepare_data(config.data, _base(config, store, base_key), store))


@flow(name="loraforge-train", persist_result=True, log_prints=True)
@within_stage_timeout
def train_flow(config: PipelineConfig, base_key: str, data_key: str, only: str | None = None) -> StageOutcome:
    """The train stage: the LoRA adapter."""
    store = _store(config, only)
    base = _base(config, store, base_key)
    return _result(store, train_adapter(config.train, base, store.get("data", data_key), store))


@flow(name="loraforge-eval", persist_result=True, log_prints=True)
@within_stage_timeout
def eval_flow(
    config: PipelineConfig, base_key: str, data_key: str, train_key: str, only: str | None = None
) -> StageOutcome:
    """The eval stage: base vs tuned on the test split and the gate verdict (the pipeline enforces it)."""
    store = _store(config, only)
    base = _base(config, store, base_key)
    data, train = store.get("data", data_key), store.get("train", train_key)
    return _result(store, evaluate_adapter(config.eval, base, data, train, store))


@flow(name="loraforge-merge", persist_result=True, log_prints=True)
@within_stage_timeout
def merge_flow(
    config: PipelineConfig, base_key: str, data_key: str, train_key: str, only: str | None = None
) -> StageOutcome:
    """The merge stage: the adapter merged into the base model, checked against the adapter."""
    store = _store(config, only)
    base = _base(config, store, base_key)
    data, train = store.get("data", data_key), store.get("train", train_key)
    return _result(store, merge_adapter(config.merge, base, data, train, store))


@flow(name="loraforge-quantize", persist_result=True, log_prints=True)
@within_stage_timeout
def quantize_flow(
    config: PipelineConfig, base_key: str, data_key: str, train_key: str, merge_key: str, only: str | None = None
) -> StageOutcome:
    """The quantize stage: GGUF files of the merged model (and of the adapter, against the base provisioned on
    this worker), each checked in llama-cpp-python."""
    store = _store(config, only)
    base = _base(config, store, base_key)
    data, train, merge = store.get("data", data_key), store.get("train", train_key), store.get("merge", merge_key)
    return _result(store, quantize_gguf(config.quantize, config.name, base, data, train, merge, store))


@flow(name="loraforge-publish", persist_result=True, log_prints=True)
@within_stage_timeout
def publish_flow(
    config: PipelineConfig,
    base_key: str,
    data_key: str,
    train_key: str,
    eval_key: str,
    merge_key: str,
    quantize_key: str,
    only: str | None = None,
) -> StageOutcome:
    """The publish stage: bundle, model card and lineage, pushed to the Hub when a token is set.

    The base artifact is read from the store (its manifest only): this stage never loads weights.
    """
    store = _store(config, only)
    base, data, train = store.get("base", base_key), store.get("data", data_key), store.get("train", train_key)
    eval_, merge, quantize = (
        store.get("eval", eval_key),
        store.get("merge", merge_key),
        store.get("quantize", quantize_key),
    )
    published = publish_model(config.publish, config.name, config.orchestration.approval, base, data, train, eval_,
                              merge, quantize, store)  # fmt: skip
    return _result(store, published)


STAGE_FLOWS = {
    "base": base_flow,
    "data": data_flow,
    "train": train_flow,
    "eval": eval_flow,
    "merge": merge_flow,
    "quantize": quantize_flow,
    "publish": publish_flow,
}
