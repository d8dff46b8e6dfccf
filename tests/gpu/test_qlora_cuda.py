"""QLoRA on CUDA (marked gpu: skipped without CUDA, run on a machine with a GPU): 4-bit NF4 with double
quantization and bf16 compute trains on the GPU, evaluates and merges as trained, and paged 8-bit AdamW runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train_variants_helper import train as _train

from loraforge.tasks.artifacts import ArtifactStore

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def test_qlora_4bit_bf16_trains_on_cuda(tiny_model: Path, tmp_path: Path) -> None:
    import torch

    store = ArtifactStore(tmp_path / "store")
    train = _train(tiny_model, store, "train.quantization=4bit", "train.compute_dtype=bfloat16",
                   "train.optimizer=paged_adamw_8bit", "train.max_steps=6")  # fmt: skip
    assert train.manifest["device"] == "cuda"
    assert train.metrics["cuda_peak_mb"] > 0 and torch.cuda.max_memory_allocated() > 0
    assert train.metrics["val_loss"] < train.metrics["val_loss_before"]

    from test_train_variants_helper import SMALL

    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.evaluate import evaluate_adapter
    from loraforge.tasks.merge import merge_adapter
    from loraforge.tasks.models import provision_base

    config = load_config(DEMO_CONFIG, [f"base_model={tiny_model}", *SMALL, "eval.gate=[loss_delta < 0]"])
    base = provision_base(str(tiny_model), store)
    data = prepare_data(config.data, base, store)
    evaluated = evaluate_adapter(config.eval, base, data, train, store)
    assert evaluated.metrics["loss"] < evaluated.metrics["base_loss"]
    merged = merge_adapter(config.merge, base, data, train, store)
    assert merged.metrics["vs_trained_top1_agreement"] > 0.9


def test_lora_and_qlora_memory_on_cuda(tiny_model: Path, tmp_path: Path) -> None:
    lora = _train(tiny_model, ArtifactStore(tmp_path / "lora"), "train.max_steps=2")
    qlora = _train(tiny_model, ArtifactStore(tmp_path / "qlora"), "train.quantization=4bit",
                   "train.compute_dtype=bfloat16", "train.max_steps=2")  # fmt: skip
    assert lora.manifest["device"] == qlora.manifest["device"] == "cuda"
    assert qlora.metrics["cuda_peak_mb"] <= lora.metrics["cuda_peak_mb"]
