"""The loraforge pipeline as a Prefect flow: base -> data -> train -> eval (gate) -> merge -> quantize -> publish.

Each stage is a Prefect task wrapping the plain stage function from tasks/; the flow only wires artifacts from
one stage to the next. Caching is the artifact store's (content keys), not Prefect's; a stage that was a cache hit
shows as a `Cached` task run (flows/stage_runs.py).

With `orchestration.stages: deployments` each stage instead runs as a flow run of its own deployment
(flows/stages.py, infra/prefect.yaml) through `run_deployment`, on whichever worker serves that deployment's
pool; the artifacts are on a store all workers share, so the keys are those of an in-process run.
With `orchestration.approval: true` the flow pauses before publish until a reviewer resumes it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.input import RunInput
from prefect.runtime import flow_run as prefect_run

from loraforge.flows.stage_runs import cached_state, step_reporter, unwrap
from loraforge.tasks.artifacts import Artifact, ArtifactStore
from loraforge.tasks.config import PipelineConfig, load_config
from loraforge.tasks.errors import ConfigError, GateFailed, StageError
from loraforge.tasks.evaluate import read_gate
from loraforge.tasks.publish import read_publish, record_approval
from loraforge.tasks.quantize import probe_summary, read_quantize
from loraforge.tasks.registry import STAGES, Stage

StageCall = Callable[..., Artifact | State[Artifact]]  # a stage's task (or its deployment's stand-in)


def _stage_task(stage: Stage) -> Task[..., Artifact | State[Artifact]]:
    """The stage function as a Prefect task whose run ends `Cached` when the store already had the artifact.

    Calling the task gives that state on a cache hit, else the artifact: `unwrap` it (the pipeline's `step` does).
    """
    produce = stage.function()

    @functools.wraps(produce)
    def run(*args: Any, **kwargs: Any) -> Artifact | State[Artifact]:
        if stage.steps and kwargs.get("on_step") is None:  # its progress in the Prefect UI while it runs
            kwargs["on_step"] = step_reporter(stage.name)  # (Prefect passes the signature's default, None)
        artifact = produce(*args, **kwargs)
        return cached_state(artifact, artifact)

    return task(name=stage.name, cache_policy=NO_CACHE)(run)


IN_PROCESS: dict[str, StageCall] = {s.name: _stage_task(s) for s in STAGES}


def call_stage(call: StageCall, stage: Stage, config: PipelineConfig, artifacts: dict[str, Artifact],
               store: ArtifactStore) -> Artifact:  # fmt: skip
    """Run one stage's task (or its deployment's stand-in) on its upstream artifacts: the artifact it made or found."""
    return unwrap(call(*stage.arguments(config, artifacts), store))


class Approval(RunInput):
    """What a reviewer answers when the run pauses before publish."""

    approve: bool
    reason: str = ""


@flow(name="loraforge-pipeline", log_prints=True)
def pipeline(config: PipelineConfig, only: str | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Run every stage in order (or, with `only`, that stage alone on existing upstream artifacts).

    Returns:
        The run record: per stage its key, path, whether it was a cache hit and its wall time; eval metrics
        and the gate verdict; the Prefect flow run's id. The record is also written to `<store>/runs/<run-id>.json`.

    Raises:
        GateFailed: the eval gate failed (nothing after eval runs, nothing is published).
    """
    store = ArtifactStore(config.store, config.store_verify)
    store.check_writable()
    if removed := store.clean_drafts():
        print(f"[store] removed {len(removed)} unfinished draft(s) of killed runs from {store.root / '.tmp'}")
    if only is not None:
        store = store.restricted_to("base", only)
    if config.orchestration.approval or config.orchestration.stages == "deployments":
        _require_server(config)
    stages: dict[str, StageCall] = IN_PROCESS
    if config.orchestration.stages == "deployments":
        stages = {name: _deployed(name, config, store, only) for name in IN_PROCESS}
    run: dict[str, Any] = {
        "run_id": run_id or uuid.uuid4().hex[:12],
        "name": config.name,
        "store": store.url,
        "stages": {},
        "flow_run_id": prefect_run.id,  # this run in the Prefect UI (None when called as pipeline.fn)
    }
    run["config"] = config.model_dump(mode="json")

    def step(stage: Stage, artifacts: dict[str, Artifact]) -> Artifact:
        started = time.perf_counter()
        artifact = call_stage(stages[stage.name], stage, config, artifacts, store)
        run["stages"][stage.name] = {
            "key": artifact.key, "path": str(artifact.path), "cached": artifact.cached,
            "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        print(
            f"[{stage.name}] {'cache hit' if artifact.cached else 'done'}: {artifact.key} "
            f"({run['stages'][stage.name]['seconds']} s)"
        )
        store.record_run(run["run_id"], run)
        return artifact

    artifacts: dict[str, Artifact] = {}
    try:
        for stage in STAGES:
            if stage.approval and config.orchestration.approval:
                run["approval"] = _await_approval(config, store, artifacts["eval"], artifacts["quantize"])
            artifacts[stage.name] = step(stage, artifacts)
            run.update(RECORDS.get(stage.name, _nothing)(artifacts[stage.name]))
            if report := REPORTS.get(stage.name):
                report(artifacts[stage.name])
            stage.verify(artifacts[stage.name])
            if only == stage.name:
                break
        return run
    finally:
        try:
            store.record_run(run["run_id"], run)
        except (OSError, StageError) as exc:  # never mask the run's own outcome with a failure to write its record
            print(f"[store] could not write the run record to {store.where}/runs: {exc}")


@flow(name="loraforge-run", log_prints=True, persist_result=True)
def run_pipeline(
    config_path: str = "flows/configs/demo.yaml", overrides: list[str] | None = None, data_file: str | None = None
) -> dict[str, Any]:
    """The pipeline deployment's entry point (nightly schedule, data-registered trigger): load and run a config.

    Args:
        config_path: the YAML config, relative to the working directory (the code folder on a worker).
        overrides: `key=value` overrides, as on the command line.
        data_file: a newly registered training file (`loraforge register-data`): becomes `data.train_file`.
    """
    items = [*(overrides or []), *([f"data.train_file={data_file}"] if data_file else [])]
    return pipeline(load_config(config_path, items))


DEPLOYMENTS = {stage: f"loraforge-{stage}/{stage}" for stage in IN_PROCESS}  # flow name / deployment name


def _require_server(config: PipelineConfig) -> None:
    """Deployments and approvals live on a Prefect server; the temporary in-process one cannot serve them."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        wanted = [f"orchestration.{k}={v}" for k, v in (("stages", "deployments"), ("approval", "true"))
                  if str(getattr(config.orchestration, k)).lower() == v]  # fmt: skip
        raise ConfigError(
            f"{' and '.join(wanted)} needs a Prefect server with the loraforge deployments and workers: start one "
            "(`make stack`) and set PREFECT_API_URL, or run with orchestration.stages=in_process, "
            "orchestration.approval=false."
        )


def _idempotency_key(stage: str, parameters: dict[str, Any]) -> str | None:
    """The stage run's idempotency key: this pipeline run (and its attempt), the stage and its parameters.

    Prefect's client retries a request that timed out (a loaded server); for the POST creating the stage's flow
    run, the server may have created it already. With the key it hands back that run instead of starting the
    stage a second time. None outside a flow run (nothing to be the same run of).
    """
    if prefect_run.id is None:
        return None
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:16]
    return f"{prefect_run.id}.{prefect_run.run_count}.{stage}.{digest}"


def _deployed(stage: str, config: PipelineConfig, store: ArtifactStore, only: str | None) -> Callable[..., Artifact]:
    """A stand-in for the stage's task: runs the stage's deployment and returns its artifact from the store.

    It takes the task's arguments and passes on only the keys of the upstream artifacts among them; the stage
    flow gets the whole config (with the store as an absolute URL, the same on every worker).
    """
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from loraforge.flows.stages import stage_run_record

    shared = config.model_copy(update={"store": store.url}).model_dump(mode="json")

    def run_stage(*args: Any) -> Artifact:
        upstream = {a.stage: a.key for a in args if isinstance(a, Artifact)}
        parameters = {"config": shared, "inputs": upstream, "only": only}
        try:
            flow_run = cast(FlowRun, run_deployment(  # called from sync code: the FlowRun itself
                DEPLOYMENTS[stage], parameters=parameters, idempotency_key=_idempotency_key(stage, parameters),
                timeout=config.orchestration.stage_timeout_s, poll_interval=1,  # the stage's end seen within 1 s
            ))  # fmt: skip
        except ObjectNotFound:
            raise StageError(
                f"no deployment {DEPLOYMENTS[stage]!r} on the Prefect server {os.environ.get('PREFECT_API_URL')}: "
                "deploy the stages first (`make deploy`: prefect deploy --all --prefect-file infra/prefect.yaml)."
            ) from None
        state = flow_run.state
        if state is None or not state.is_final():
            _cancel(flow_run)  # nobody waits for it any more: it must not run (or publish) behind the user's back
            raise StageError(
                f"{stage} stage: flow run {flow_run.name} did not finish within orchestration.stage_timeout_s="
                f"{config.orchestration.stage_timeout_s} s (state {state.name if state else 'unknown'}) and was "
                "cancelled; is a worker polling the deployment's work pool? Raise the timeout for a long stage."
            )
        if not state.is_completed():
            raise StageError(f"{stage} stage: flow run {flow_run.name} ended {state.type.value}: {state.message}")
        result = store.read_record(stage_run_record(str(flow_run.id)))
        if result is None:
            raise StageError(
                f"{stage} stage: flow run {flow_run.name} completed but left no result in the store {store.where}: "
                "the workers must use the same store as the pipeline (for s3://, the same AWS_ENDPOINT_URL)."
            )
        return dataclasses.replace(store.get(stage, result["key"]), cached=bool(result["cached"]))

    return run_stage


def _cancel(flow_run: Any) -> None:
    """Ask the server to cancel a stage's flow run (a worker running it stops it; a scheduled one never starts)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Cancelling(message="orchestration.stage_timeout_s passed"), force=True)


def _await_approval(
    config: PipelineConfig, store: ArtifactStore, eval_: Artifact, quantize: Artifact
) -> dict[str, Any]:
    """Pause the flow run until a reviewer answers; a refusal or no answer in time stops before publish."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    verdict = read_gate(eval_).summary()
    gguf = ", ".join(read_quantize(quantize).passed())
    description = (
        f"Publish **{config.name}** to `{config.publish.repo_id}`? Gate passed: {verdict}. GGUF: {gguf or 'none'}. "
        "Eval report: the `eval-report` artifact. Set approve=true to publish."
    )
    print(f"waiting for approval before publish (up to {config.orchestration.approval_timeout_s} s)")
    try:
        answer = pause_flow_run(wait_for_input=Approval.with_initial_data(description=description, approve=False),
                                timeout=config.orchestration.approval_timeout_s, poll_interval=2)  # fmt: skip
    except FlowPauseTimeout:
        raise GateFailed(
            f"no approval within orchestration.approval_timeout_s={config.orchestration.approval_timeout_s} s; "
            "nothing was published"
        ) from None
    if not answer.approve:
        raise GateFailed(f"publish not approved by the reviewer: {answer.reason or 'no reason given'}")
    from prefect.runtime import flow_run

    answer_record = {"approved": True, "reason": answer.reason, "flow_run_id": str(flow_run.id)}
    record_approval(store, eval_, quantize, answer_record)
    return answer_record


def _report_eval(eval_: Artifact) -> None:
    """Show the eval report and metrics in the Prefect UI (markdown + table artifacts)."""
    create_markdown_artifact(markdown=eval_.file("report.md").read_text(), key="eval-report",
                             description=f"eval {eval_.key}")  # fmt: skip
    rows = [{"metric": k, "value": v} for k, v in sorted(eval_.metrics.items())]
    create_table_artifact(table=rows, key="eval-metrics", description=f"eval {eval_.key}")


def _report_data(data: Artifact) -> None:
    """Rows, tokens, lengths, drops and truncations per split, and prompt leakage, as a Prefect table."""
    import json

    report = json.loads(data.file("report.json").read_text())
    rows = [{"split": split, **stats} for split, stats in report["splits"].items()]
    create_table_artifact(table=rows, key="data-report",
                          description=f"data {data.key}; leakage {report.get('leakage')}")  # fmt: skip


def _report_train(train: Artifact) -> None:
    """The training curve (loss, lr, grad norm, tokens/s, memory, validation loss) as a Prefect table."""
    import json

    history = [json.loads(line) for line in train.file("history.jsonl").read_text().splitlines()]
    m = train.metrics
    summary = (
        f"{m.get('trainable_params')} trainable params, val loss {m.get('val_loss_before')} -> {m.get('val_loss')}"
    )
    create_table_artifact(table=history, key="train-history", description=f"train {train.key}: {summary}")


def _report_gguf(quantize: Artifact) -> None:
    """Each GGUF file's fidelity against the merged model, its probe (the eval's answer metrics vs the merged
    model's, one text cell) and its verdict, as a Prefect table."""
    columns = ("file", "size_mb", "mean_kl", "top1_agreement", "ppl_ratio")
    rows = [{"type": q, **{c: g.get(c) for c in columns}, "probe": probe_summary(g).removeprefix("probe "),
             "passed": g.get("passed"), "reason": g.get("reason")}
            for q, g in read_quantize(quantize).gguf.items()]  # fmt: skip
    create_table_artifact(table=rows, key="gguf-fidelity", description=f"quantize {quantize.key}")


def _nothing(artifact: Artifact) -> dict[str, Any]:
    return {}


# What a stage adds to the run record beside its key (`loraforge show`, the CLI summary) ...
RECORDS: dict[str, Callable[[Artifact], dict[str, Any]]] = {
    "eval": lambda eval_: {"eval": eval_.metrics, "gate": read_gate(eval_)._asdict()},
    "quantize": lambda quantize: {"gguf": read_quantize(quantize).gguf},
    "publish": lambda publish: {"publish": read_publish(publish)._asdict()},
}
# ... and what it shows in the Prefect UI (markdown and table artifacts). A stage with neither needs no entry.
REPORTS: dict[str, Callable[[Artifact], None]] = {
    "data": _report_data, "train": _report_train, "eval": _report_eval, "quantize": _report_gguf,
}  # fmt: skip
