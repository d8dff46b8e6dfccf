"""A sweep as a Prefect flow: train and evaluate one variant per grid point, then one comparison table.

    loraforge sweep CONFIG --r 4,8,16,32,64 [key=value ...]
    loraforge sweep CONFIG --grid train.r=8,16 --grid train.target_modules=attention,all-linear

Every variant goes through the real stages (base -> data -> train -> eval, the same stage functions as
flows/pipeline.py), so its artifacts are content-addressed like any run's: re-running a sweep, or adding
ranks to it, trains only what is new. The eval gate is recorded per variant, not enforced: a sweep compares.

Peak memory per variant is honest only if each variant trains in a process of its own: ru_maxrss is a
process high-water mark, so a later variant trained in the same process would report the largest peak so far.
So each variant's train stage runs in a fresh child process (`python -m flows.sweep --train-child
CONFIG.json`) and the table shows that child's VmHWM, polled from /proc (not its ru_maxrss: Linux carries the
parent's RSS high-water into a child's ru_maxrss at exec, and this parent holds evaluated models). The figure
is kept in `<store>/sweeps/peaks/<train key>.json`, so a re-run (all cache hits) shows the same numbers; a
train artifact no sweep trained shows the train stage's own recorded `peak_rss_mb`.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from loraforge.flows.pipeline import IN_PROCESS, call_stage
from loraforge.tasks.artifacts import Artifact, ArtifactStore
from loraforge.tasks.config import PipelineConfig
from loraforge.tasks.errors import StageError
from loraforge.tasks.evaluate import read_gate
from loraforge.tasks.registry import stage

TABLE_METRICS = ("accuracy", "macro_f1", "exact_match", "rouge_l", "entity_f1", "loss", "perplexity")


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, in order: {"train.r": "4"}, {"train.r": "8"}, ..."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


@flow(name="loraforge-sweep", log_prints=True)
def sweep(variants: list[tuple[dict[str, str], PipelineConfig]], sweep_id: str | None = None) -> dict[str, Any]:
    """Train and evaluate every variant; return (and write) the comparison table.

    Args:
        variants: (the grid point, the full config with it applied) per variant; all share one store.
        sweep_id: names the record; default a random id.

    Returns:
        {"sweep_id", "store", "rows": [one dict per variant], "json", "markdown"}; the JSON and markdown
        tables are written to `<store>/sweeps/<sweep_id>.json|.md`.
    """
    sweep_id = sweep_id or uuid.uuid4().hex[:12]
    rows: list[dict[str, Any]] = []
    for point, config in variants:
        store = ArtifactStore(config.store, config.store_verify)
        artifacts: dict[str, Artifact] = {}
        for name in ("base", "data"):
            artifacts[name] = _stage(name, config, artifacts, store)
        train, trained_now, peak = _train(config, artifacts["base"], artifacts["data"], store)
        evaluated = _stage("eval", config, {**artifacts, "train": train}, store)
        rows.append(_row(point, config, train, evaluated, trained_now, peak))
        print(f"[sweep] {point}: {_summary(rows[-1])}")
    store = ArtifactStore(variants[0][1].store, variants[0][1].store_verify)
    record = {"sweep_id": sweep_id, "store": store.url, "rows": rows}
    markdown = to_markdown(rows)
    where_md = store.write_record(f"sweeps/{sweep_id}.md", markdown)
    record.update(json=store.write_record(f"sweeps/{sweep_id}.json", record), markdown=where_md)
    create_table_artifact(table=rows, key="sweep", description=f"sweep {sweep_id}: {len(rows)} variants")
    create_markdown_artifact(markdown=markdown, key="sweep-table", description=f"sweep {sweep_id}")
    return record


def _stage(name: str, config: PipelineConfig, artifacts: dict[str, Artifact], store: ArtifactStore) -> Artifact:
    """One of the pipeline's stage tasks (a cache hit shows `Cached`), on the variant's upstream artifacts."""
    return call_stage(IN_PROCESS[name], stage(name), config, artifacts, store)


def _train(
    config: PipelineConfig, base: Artifact, data: Artifact, store: ArtifactStore
) -> tuple[Artifact, bool, float | None]:
    """The variant's train artifact, produced (or found cached) by the train stage in a fresh child process.

    Returns:
        The artifact, whether the child trained it now (False: a cache hit) and the training process's own peak
        RSS in MB (VmHWM, measured now or recorded by an earlier sweep in `<store>/sweeps/peaks/<key>.json`).
    """
    from loraforge.tasks.plan import run_measuring_peak_rss

    spec = store.root / ".tmp" / f"sweep-train-{uuid.uuid4().hex[:8]}.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(config.model_dump_json())
    # progress bars are \r-lines (the stage prints its own summary); library deprecation chatter says nothing here
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    try:
        code, peak_mb, output = run_measuring_peak_rss(
            [sys.executable, "-m", "loraforge.flows.sweep", "--train-child", str(spec)],
            env=env,
            echo=lambda line: None if line.startswith("{") else print(line),
        )
    finally:
        spec.unlink(missing_ok=True)
    lines = output.strip().splitlines()
    if code != 0 or not lines or not lines[-1].startswith("{"):
        tail = "\n".join(lines[-6:])
        raise StageError(f"sweep: training the variant with train.r={config.train.r} failed (exit {code}):\n{tail}")
    child = json.loads(lines[-1])
    train = _stage("train", config, {"base": base, "data": data}, store)  # the child wrote it: a cache hit here
    if train.key != child["key"]:
        raise StageError(f"sweep: the child made train artifact {child['key']}, this process expects {train.key}")
    record = f"sweeps/peaks/{train.key}.json"
    if not child["cached"]:
        print(f"[sweep] train {train.key}: peak RSS of its process {peak_mb:.0f} MB (VmHWM)")
        store.write_record(record, {"train_key": train.key, "peak_rss_mb": round(peak_mb, 1)})
    recorded = (store.read_record(record) or {}).get("peak_rss_mb")
    return train, not child["cached"], recorded


def _row(
    point: dict[str, str],
    config: PipelineConfig,
    train: Artifact,
    evaluated: Artifact,
    trained_now: bool,
    peak: float | None,
) -> dict[str, Any]:
    """One table row, read from the variant's train and eval artifacts."""
    m = train.metrics
    adapter = train.file("adapter") / "adapter_model.safetensors"
    row: dict[str, Any] = {
        **point,
        "r": config.train.r,
        "trainable_params": m.get("trainable_params"),
        "adapter_mb": round(adapter.stat().st_size / 1024 / 1024, 3),
        "peak_rss_mb": peak if peak is not None else m.get("peak_rss_mb"),
        "trained_now": trained_now,
        "train_seconds": m.get("train_seconds"),
        "val_loss": m.get("val_loss"),
    }
    row.update({k: evaluated.metrics[k] for k in TABLE_METRICS if k in evaluated.metrics})
    row.update({
        "gate_passed": read_gate(evaluated).passed,
        "train_key": train.key, "eval_key": evaluated.key,
        "cached": not trained_now and evaluated.cached,
    })  # fmt: skip
    return row


def _summary(row: dict[str, Any]) -> str:
    metrics = ", ".join(f"{k} {row[k]}" for k in TABLE_METRICS if k in row)
    return (
        f"{row['trainable_params']:,} params, adapter {row['adapter_mb']} MB, peak {row['peak_rss_mb']} MB, "
        f"{row['train_seconds']} s, {metrics}{' (cached)' if row['cached'] else ''}"
    )


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The sweep table as markdown (one row per variant)."""
    hidden = {"trained_now", "train_key", "eval_key"}
    columns = [c for c in rows[0] if c not in hidden] if rows else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:,}" if isinstance(row[c], int) and not isinstance(row[c], bool) else str(row[c])
                 for c in columns]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    notes = (
        "\npeak_rss_mb: the peak RSS (VmHWM) of the process that trained the variant, a child process of its own "
        "started by a sweep; for an artifact no sweep trained, the train stage's recorded ru_maxrss (which also "
        "carries the RSS of whatever process started it). train_seconds: wall time on a shared machine."
    )
    return "\n".join(lines) + "\n" + notes + "\n"


def _train_child(spec: Path) -> int:
    """In the child process: run the train stage for one variant (base and data are cache hits)."""
    from loraforge.tasks.errors import LoraforgeError

    config = PipelineConfig.model_validate_json(spec.read_text())
    store = ArtifactStore(config.store, config.store_verify)
    try:
        artifacts: dict[str, Artifact] = {}
        for name in ("base", "data", "train"):  # the plain stage functions: no Prefect run in the child
            artifacts[name] = stage(name).run(config, artifacts, store)
        train = artifacts["train"]
    except LoraforgeError as exc:
        print(f"loraforge: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"key": train.key, "cached": train.cached}))  # the last line: read by the parent
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--train-child":
        sys.exit(_train_child(Path(sys.argv[2])))
    sys.exit("usage: python -m flows.sweep --train-child CONFIG.json (run sweeps with `loraforge sweep`)")
