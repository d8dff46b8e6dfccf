"""Train stage: fit a LoRA adapter on the data artifact with a lean, seeded PyTorch loop.

The loop pads each batch only to its longest row and groups rows of similar length, so little compute goes to
padding; loss is computed only where labels are set (the completion, unless data.train_on_prompt).
Run alone: `loraforge stage train CONFIG [key=value ...]`.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts import Artifact, ArtifactStore
from tasks.batching import collate, mean_loss, read_split
from tasks.errors import StageError

LENGTH_GROUP_BATCHES = 16  # rows are sorted by length inside windows of this many batches


class TrainConfig(BaseModel):
    """LoRA and optimisation settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the linear layers that get adapters; checked against the model's own names.",
    )
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored if max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    group_by_length: bool = Field(True, description="Batch rows of similar length together (less padding).")
    seed: int = Field(42, description="Seed for adapter init, dropout and data order.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    log_every: int = Field(5, ge=1, description="Record metrics every N optimizer steps.")


def train_adapter(config: TrainConfig, base: Artifact, data: Artifact, store: ArtifactStore) -> Artifact:
    """Train a LoRA adapter; skipped when the same artifact exists.

    Args:
        config: the train section of the pipeline config.
        base: the base-model artifact.
        data: the data artifact (train and validation splits).
        store: where artifacts live.

    Returns:
        The train artifact: `adapter/` (peft safetensors + adapter_config.json) and `history.jsonl`.
    """
    inputs = {"base": base, "data": data}
    key, code = store.stage_key("train", __file__, config, inputs)
    if (hit := store.find("train", key)) is not None:
        return hit

    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from tasks.models import load_causal_lm, load_tokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    _seed_everything(config.seed)
    model_path = Path(base.manifest["model_path"])
    tokenizer = load_tokenizer(model_path)
    model: Any = load_causal_lm(model_path)
    _check_target_modules(model, config.target_modules)
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"[train] LoRA r={config.r} on {', '.join(config.target_modules)}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )

    train_rows = read_split(data.file("train.jsonl"))
    val_rows = read_split(data.file("validation.jsonl"))
    steps_per_epoch = math.ceil(len(train_rows) / (config.batch_size * config.grad_accum))
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = _scheduler(optimizer, config, total_steps)
    pad_id = tokenizer.pad_token_id

    val_loss_before = mean_loss(model, val_rows, config.batch_size, pad_id)
    history: list[dict[str, Any]] = []
    model.train()
    generator = random.Random(config.seed)
    batches = _batches(train_rows, config, generator)
    tokens_seen = 0
    started = time.perf_counter()
    progress = tqdm(range(1, total_steps + 1), desc="train", unit="step", dynamic_ncols=True)
    for step in progress:
        step_loss = 0.0
        for _ in range(config.grad_accum):
            batch = next(batches)
            input_ids, labels, mask = collate(batch, pad_id)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss / config.grad_accum
            loss.backward()
            step_loss += loss.item()
            tokens_seen += int(mask.sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        if not math.isfinite(step_loss) or not math.isfinite(grad_norm):
            raise StageError(
                f"training diverged at step {step} (loss {step_loss}, grad norm {grad_norm}); "
                "lower train.learning_rate or raise train.warmup_ratio."
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
        if step % config.log_every == 0 or step == total_steps:
            history.append({
                "step": step, "loss": round(step_loss, 5), "lr": scheduler.get_last_lr()[0],
                "grad_norm": round(grad_norm, 5), "tokens": tokens_seen,
                "tokens_per_s": round(tokens_seen / elapsed, 1), "rss_mb": _peak_rss_mb(),
            })  # fmt: skip
    progress.close()
    train_seconds = time.perf_counter() - started
    val_loss_after = mean_loss(model, val_rows, config.batch_size, pad_id)
    print(f"[train] validation loss {val_loss_before:.4f} -> {val_loss_after:.4f} in {train_seconds:.0f} s")

    with store.create("train", key, config, inputs, code) as draft:
        model.save_pretrained(draft.path / "adapter", safe_serialization=True)
        # Record the base by its public name, not this machine's path, so the adapter folder is portable
        # (patched after saving: peft would otherwise try to reach the Hub to inspect that name).
        adapter_config = draft.path / "adapter" / "adapter_config.json"
        settings = json.loads(adapter_config.read_text())
        settings["base_model_name_or_path"] = base.manifest.get("hub_id") or base.manifest["base_model"]
        adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True))
        with (draft.path / "history.jsonl").open("w") as out:
            out.writelines(json.dumps(h) + "\n" for h in history)
        draft.metrics.update({
            "trainable_params": trainable, "total_params": total, "steps": total_steps,
            "train_loss": history[-1]["loss"], "val_loss_before": round(val_loss_before, 5),
            "val_loss": round(val_loss_after, 5), "tokens": tokens_seen,
            "tokens_per_s": round(tokens_seen / train_seconds, 1), "train_seconds": round(train_seconds, 1),
            "peak_rss_mb": _peak_rss_mb(),
        })  # fmt: skip
    return store.get("train", key, fresh=True)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _check_target_modules(model: Any, wanted: list[str]) -> None:
    """Fail early, listing the valid names, when a target module does not exist in the model."""
    import torch

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    unknown = [name for name in wanted if name not in linear]
    if unknown:
        raise StageError(
            f"train.target_modules: {', '.join(map(repr, unknown))} not found in the model's linear layers; "
            f"valid names: {', '.join(linear)}"
        )


def _batches(rows: list[dict[str, Any]], config: TrainConfig, rng: random.Random) -> Any:
    """Endless iterator of batches: shuffled each epoch, length-grouped within windows if configured."""
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        if config.group_by_length:
            window = config.batch_size * LENGTH_GROUP_BATCHES
            order = [
                i
                for start in range(0, len(order), window)
                for i in sorted(order[start : start + window], key=lambda i: -len(rows[i]["input_ids"]))
            ]
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        if config.group_by_length:
            rng.shuffle(batches)  # keep grouped batches but not in length order
        for batch in batches:
            yield [rows[i] for i in batch]


def _scheduler(optimizer: Any, config: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.scheduler == "constant" else config.scheduler
    return get_scheduler(
        name, optimizer, num_warmup_steps=round(config.warmup_ratio * total_steps), num_training_steps=total_steps
    )


def _peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
