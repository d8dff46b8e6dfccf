"""The loraforge pipeline as a Prefect flow: base -> data -> train -> eval (gate) -> merge -> quantize -> publish.

Each stage is a Prefect task wrapping the plain stage function from tasks/; the flow only wires artifacts from
one stage to the next. Caching is the artifact store's (content keys), not Prefect's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.artifacts import Artifact, ArtifactStore
from tasks.config import PipelineConfig
from tasks.data import prepare_data
from tasks.evaluate import check_gate, evaluate_adapter
from tasks.merge import merge_adapter
from tasks.models import provision_base
from tasks.publish import publish_model
from tasks.quantize import quantize_gguf
from tasks.train import train_adapter

STAGES = ("data", "train", "eval", "merge", "quantize", "publish")

base_task = task(name="base", cache_policy=NO_CACHE)(provision_base)
data_task = task(name="data", cache_policy=NO_CACHE)(prepare_data)
train_task = task(name="train", cache_policy=NO_CACHE)(train_adapter)
eval_task = task(name="eval", cache_policy=NO_CACHE)(evaluate_adapter)
merge_task = task(name="merge", cache_policy=NO_CACHE)(merge_adapter)
quantize_task = task(name="quantize", cache_policy=NO_CACHE)(quantize_gguf)
publish_task = task(name="publish", cache_policy=NO_CACHE)(publish_model)


@flow(name="loraforge-pipeline", log_prints=True)
def pipeline(config: PipelineConfig, only: str | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Run every stage in order (or, with `only`, that stage alone on existing upstream artifacts).

    Returns:
        The run record: per stage its key, path, whether it was a cache hit and its wall time; eval metrics
        and the gate verdict. The record is also written to `<store>/runs/<run-id>.json`.

    Raises:
        GateFailed: the eval gate failed (nothing after eval runs, nothing is published).
    """
    store = ArtifactStore(config.store)
    if only is not None:
        store = store.restricted_to("base", only)
    run: dict[str, Any] = {
        "run_id": run_id or uuid.uuid4().hex[:12],
        "name": config.name,
        "store": store.url,
        "stages": {},
    }
    run["config"] = config.model_dump(mode="json")

    def step(name: str, produce: Any, *args: Any) -> Artifact:
        started = time.perf_counter()
        artifact: Artifact = produce(*args, store)
        run["stages"][name] = {
            "key": artifact.key, "path": str(artifact.path), "cached": artifact.cached,
            "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        print(
            f"[{name}] {'cache hit' if artifact.cached else 'done'}: {artifact.key} "
            f"({run['stages'][name]['seconds']} s)"
        )
        store.record_run(run["run_id"], run)
        return artifact

    try:
        base = step("base", base_task, config.base_model)
        data = step("data", data_task, config.data, base)
        _report_data(data)
        if only == "data":
            return run
        train = step("train", train_task, config.train, base, data)
        _report_train(train)
        if only == "train":
            return run
        eval_ = step("eval", eval_task, config.eval, base, data, train)
        run["eval"] = eval_.metrics
        run["gate"] = eval_.manifest["gate"]
        _report_eval(eval_)
        check_gate(eval_)
        if only == "eval":
            return run
        merge = step("merge", merge_task, config.merge, base, data, train)
        if only == "merge":
            return run
        quantize = step("quantize", quantize_task, config.quantize, config.name, data, merge)
        run["gguf"] = quantize.manifest.get("gguf", {})
        _report_gguf(quantize)
        if only == "quantize":
            return run
        publish = step("publish", publish_task, config.publish, config.name, base, data, train, eval_, merge, quantize)
        run["publish"] = {k: publish.manifest.get(k) for k in ("mode", "repo_id", "endpoint", "tag", "commit")}
        return run
    finally:
        store.record_run(run["run_id"], run)


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
    """Each GGUF file's fidelity against the merged model and its verdict, as a Prefect table."""
    columns = (
        "file",
        "size_mb",
        "mean_kl",
        "top1_agreement",
        "ppl_ratio",
        "accuracy",
        "hf_accuracy",
        "passed",
        "reason",
    )
    rows = [{"type": q, **{c: g.get(c) for c in columns}} for q, g in quantize.manifest.get("gguf", {}).items()]
    create_table_artifact(table=rows, key="gguf-fidelity", description=f"quantize {quantize.key}")
