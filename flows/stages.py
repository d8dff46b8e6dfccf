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

from prefect import Flow, flow
from prefect.client.schemas.objects import State

from loraforge.flows.stage_runs import cached_state, step_reporter, within_stage_timeout
from loraforge.tasks.artifacts import Artifact, ArtifactStore
from loraforge.tasks.config import PipelineConfig
from loraforge.tasks.errors import ConfigError
from loraforge.tasks.registry import STAGES, Stage

StageResult = dict[str, Any]  # {"stage": ..., "key": ..., "cached": bool}
StageOutcome = StageResult | State[StageResult]  # the result, or a `Cached` state holding it


def input_problems(
    stage: Stage, keys: dict[str, str], option: str = "inputs ", base_optional: bool = False
) -> list[str]:
    """Everything wrong with the upstream keys given for `stage` (`{"data": KEY, ...}`), each problem once.

    A key for a stage it does not take; a stage it takes and has no key for. The base's key may be left out
    when the stage provisions the base itself (it needs the weights) or when `base_optional` (the caller
    provisions it). `option` is where the keys were given, for the messages (`--input ` on the command line).
    """
    problems = [f"{option}{name}={key}: the {stage.name} stage takes no {name} artifact (it takes "
                f"{', '.join(stage.inputs)})" for name, key in keys.items() if name not in stage.inputs]  # fmt: skip
    optional = stage.weights or base_optional
    missing = [name for name in stage.inputs if name not in keys and not (name == "base" and optional)]
    if missing:
        problems.append(f"the {stage.name} stage needs {option}" + " ".join(f"{name}=KEY" for name in missing))
    return problems


def upstream(
    stage: Stage, config: PipelineConfig, store: ArtifactStore, keys: dict[str, str], option: str = "inputs "
) -> dict[str, Artifact]:
    """The stage's upstream artifacts from their keys (`{"data": KEY, ...}`), looked up in the store.

    The base is provisioned here from `base_model` when the stage needs its weights, and must then have the
    key given (when one is; `option` names where it was given, in the message): otherwise this machine sees
    other weights than the run it belongs to. A stage that needs only the base's manifest (publish) reads it
    from the store.

    Raises:
        ConfigError: a key for a stage this one does not take, or a missing one; every problem at once.
    """
    from loraforge.tasks.models import provision_base, read_base

    problems = input_problems(stage, keys, option)
    if problems:
        raise ConfigError("; ".join(problems))
    artifacts = {name: store.get(name, key) for name, key in keys.items() if name != "base" or not stage.weights}
    if "base" in stage.inputs and stage.weights:
        base = provision_base(config.base_model, store)
        if keys.get("base", base.key) != base.key:
            raise ConfigError(
                f"{option}base={keys['base']}: the base model here ({config.base_model} at "
                f"{read_base(base).model_path}) has key {base.key}: this machine sees other weights than the run "
                "it belongs to; give every worker the same model files (or mount the same model cache)."
            )
        artifacts["base"] = base
    return artifacts


def _store(config: PipelineConfig, only: str | None) -> ArtifactStore:
    """The shared store; with `only`, a view in which just that stage (and base) may write, as in-process."""
    store = ArtifactStore(config.store, config.store_verify)
    return store.restricted_to("base", only) if only is not None else store


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


def _stage_flow(stage: Stage) -> Flow[..., StageOutcome]:
    """The stage as a flow `loraforge-<stage>` taking the config and its upstream keys (`inputs`)."""

    def run(config: PipelineConfig, inputs: dict[str, str] | None = None, only: str | None = None) -> StageOutcome:
        store = _store(config, only)
        options = {"on_step": step_reporter(stage.name)} if stage.steps else {}  # progress in the UI
        return _result(store, stage.run(config, upstream(stage, config, store, inputs or {}), store, **options))

    run.__name__ = run.__qualname__ = f"{stage.name}_flow"  # its entrypoint: flows/stages.py:<stage>_flow
    run.__doc__ = f"The {stage.name} stage: {stage.produces}."
    return flow(name=f"loraforge-{stage.name}", persist_result=True, log_prints=True)(within_stage_timeout(run))


STAGE_FLOWS = {s.name: _stage_flow(s) for s in STAGES}
globals().update({f"{name}_flow": f for name, f in STAGE_FLOWS.items()})  # the deployments' entrypoints
