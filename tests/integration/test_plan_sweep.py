"""`loraforge plan` against a real train-stage run in its own process, and a two-rank sweep whose table rows
come from the real train and eval artifacts (and are cache hits the second time)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from test_train_variants_helper import SMALL

from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.config import DEMO_CONFIG, load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_plan_is_within_25_percent_of_a_real_train_run(tiny_model: Path, tmp_path: Path) -> None:
    from loraforge.tasks.plan import data_logit_positions, data_seq_len, plan_training, run_measuring_peak_rss

    overrides = [f"base_model={tiny_model}", f"store={tmp_path / 'store'}", *SMALL, "train.target_modules=all-linear"]
    config = load_config(DEMO_CONFIG, overrides)
    seq_len, source = data_seq_len(config)  # prepares the data artifact; the child finds it cached
    positions = data_logit_positions(config)
    assert 0 < positions < seq_len  # the loss is on the answers only: the head skips most positions
    plan = plan_training(config, seq_len=seq_len, seq_len_source=source, logit_positions=positions)

    code = (
        "import sys; from pathlib import Path; from tasks.artifacts import ArtifactStore; "
        "from test_train_variants_helper import train; "
        "a = train(Path(sys.argv[1]), ArtifactStore(sys.argv[2]), *sys.argv[3:]); print(a.key, a.cached)"
    )
    child = [sys.executable, "-c", code, str(tiny_model), str(tmp_path / "store"), "train.target_modules=all-linear"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "TQDM_DISABLE": "1"}
    status, peak_mb, output = run_measuring_peak_rss(child, env=env)
    assert status == 0, output[-2000:]
    key, cached = output.strip().splitlines()[-1].split()
    assert cached == "False"  # trained in the child, not found in the store
    train = ArtifactStore(tmp_path / "store").get("train", key)

    estimate = plan.memory["lora"].peak_rss_mb
    assert abs(estimate - peak_mb) / peak_mb <= 0.25, (estimate, peak_mb, plan.memory["lora"].components_mb)
    # the stage's own ru_maxrss also carries this (pytest) process's RSS high-water in at exec: never below
    assert train.metrics["peak_rss_mb"] >= peak_mb - 5
    assert plan.trainable_params == train.metrics["trainable_params"]
    assert plan.adapter_file_bytes == (train.file("adapter") / "adapter_model.safetensors").stat().st_size


def _prefect_table(key: str) -> list[dict[str, str]]:
    """The latest table artifact with this key, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    latest = max(found, key=lambda a: a.created)
    data = json.loads(latest.data) if isinstance(latest.data, str) else latest.data
    return [{k: str(v) for k, v in row.items()} for row in data]


def test_rank_sweep_table_rows_come_from_the_artifacts(tiny_model: Path, tmp_path: Path) -> None:
    from loraforge.flows.cli import main

    store = ArtifactStore(tmp_path / "store")
    args = ["sweep", str(DEMO_CONFIG), f"base_model={tiny_model}", f"store={store.root}", *SMALL,
            "eval.gate=[loss > 0]", "--r", "2,8", "--json", str(tmp_path / "sweep.json")]  # fmt: skip
    assert main(args) == 0
    record = json.loads((tmp_path / "sweep.json").read_text())
    rows = record["rows"]
    assert [row["r"] for row in rows] == [2, 8] and [row["train.r"] for row in rows] == ["2", "8"]
    for row in rows:
        train, evaluated = store.get("train", row["train_key"]), store.get("eval", row["eval_key"])
        assert train.manifest["config"]["r"] == row["r"]
        assert evaluated.manifest["inputs"]["train"]["key"] == train.key
        assert row["trainable_params"] == train.metrics["trainable_params"]
        # the child's own VmHWM, kept beside the store; the stage's ru_maxrss can only be higher (parent carry-over)
        peak = json.loads((store.root / "sweeps" / "peaks" / f"{train.key}.json").read_text())["peak_rss_mb"]
        assert row["peak_rss_mb"] == peak and 300 < peak <= train.metrics["peak_rss_mb"] + 5
        assert row["train_seconds"] == train.metrics["train_seconds"]
        size = (train.file("adapter") / "adapter_model.safetensors").stat().st_size
        assert row["adapter_mb"] == round(size / 2**20, 3)
        assert row["loss"] == evaluated.metrics["loss"] and row["accuracy"] == evaluated.metrics["accuracy"]
        assert row["trained_now"] and not row["cached"]
    assert rows[1]["trainable_params"] == 4 * rows[0]["trainable_params"]  # LoRA parameters are linear in r
    assert Path(record["markdown"]).read_text().startswith("| train.r | r | trainable_params |")
    assert _prefect_table("sweep") == [{k: str(v) for k, v in row.items()} for row in rows]

    # the same sweep again: every stage is a cache hit and the rows are the same figures
    assert main(args) == 0
    again = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert all(row["cached"] and not row["trained_now"] for row in again)
    keep = ("train_key", "eval_key", "trainable_params", "peak_rss_mb", "loss")
    assert [{k: r[k] for k in keep} for r in again] == [{k: r[k] for k in keep} for r in rows]
